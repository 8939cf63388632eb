//! A picture of a run as one self-contained SVG: completed requests per
//! 100 ms as bars, coloured by the server that answered, labelled vertical
//! markers for what happened (the kill, the failover's steps) and shaded
//! spans for what took a while (a state transfer).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

/// The width of one bar.
pub const BUCKET_NS: u64 = 100_000_000;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    pub title: String,
    /// Unix ns of x = 0.
    pub start_ns: u64,
    pub end_ns: u64,
    pub replies: Vec<Reply>,
    pub markers: Vec<Marker>,
    pub spans: Vec<Span>,
}

/// A request that got its reply at `t_ns`, from `server` when known.
#[derive(Clone, Debug, Serialize)]
pub struct Reply {
    pub t_ns: u64,
    pub server: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Marker {
    pub t_ns: u64,
    pub label: String,
}

/// A stretch of time, shaded behind the bars and labelled at their foot.
#[derive(Clone, Debug, Serialize)]
pub struct Span {
    pub start_ns: u64,
    pub end_ns: u64,
    pub label: String,
}

const WIDTH: f64 = 1000.0;
/// The height with one row of legend; each further row adds a line.
const HEIGHT: f64 = 440.0;
const LEGEND_ROW: f64 = 16.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 970.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 350.0;
const SERIES_COLORS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
];
const UNKNOWN_COLOR: &str = "#9d9d9d";
const MARKER_COLORS: [&str; 5] = ["#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4"];
/// Vertical distance between marker labels, which are stacked so that
/// markers a few milliseconds apart stay readable.
const LABEL_STEP: f64 = 15.0;
const SPAN_COLOR: &str = "#2ca02c";
/// A span this short (a transfer of a few ms) is still drawn this wide.
const SPAN_MIN_WIDTH: f64 = 3.0;

pub fn render_svg(t: &Timeline) -> String {
    let end_ns = t
        .end_ns
        .max(t.start_ns + 1)
        .max(t.replies.iter().map(|r| r.t_ns).max().unwrap_or(0))
        .max(t.markers.iter().map(|m| m.t_ns).max().unwrap_or(0))
        .max(t.spans.iter().map(|s| s.end_ns).max().unwrap_or(0));
    let span_ns = end_ns - t.start_ns;
    let buckets = usize::try_from(span_ns.div_ceil(BUCKET_NS))
        .unwrap_or(usize::MAX)
        .max(1);

    // Series in order of first reply, so the first primary gets the first
    // colour and the legend reads in the order of events.
    let mut order: Vec<Option<&str>> = Vec::new();
    let mut sorted: Vec<&Reply> = t.replies.iter().collect();
    sorted.sort_by_key(|r| r.t_ns);
    for r in &sorted {
        if !order.contains(&r.server.as_deref()) {
            order.push(r.server.as_deref());
        }
    }
    let color = |s: Option<&str>| match s {
        None => UNKNOWN_COLOR,
        Some(_) => {
            let i = order.iter().filter(|o| o.is_some()).position(|o| *o == s);
            SERIES_COLORS[i.unwrap_or(0) % SERIES_COLORS.len()]
        }
    };
    let mut counts: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    let mut totals = vec![0u64; buckets];
    for r in &sorted {
        if r.t_ns < t.start_ns {
            continue;
        }
        let b = usize::try_from((r.t_ns - t.start_ns) / BUCKET_NS)
            .unwrap_or(usize::MAX)
            .min(buckets - 1);
        let s = order
            .iter()
            .position(|o| *o == r.server.as_deref())
            .unwrap_or(0);
        *counts.entry((b, s)).or_default() += 1;
        totals[b] += 1;
    }
    let y_max = nice_ceiling(totals.iter().copied().max().unwrap_or(0).max(1));

    // The legend's entries, wrapped into rows that fit the plot's width;
    // the picture grows by a line for each row after the first.
    let legend_width = |name: &str| 30.0 + 7.0 * name.chars().count() as f64;
    let mut legend: Vec<(f64, usize, Option<&str>)> = Vec::new();
    let (mut lx, mut row) = (LEFT, 0usize);
    for series in &order {
        let w = legend_width(series.unwrap_or("unknown server"));
        if lx > LEFT && lx + w > WIDTH {
            lx = LEFT;
            row += 1;
        }
        legend.push((lx, row, *series));
        lx += w;
    }
    let height = HEIGHT + LEGEND_ROW * row as f64;

    let x_of =
        |ns: u64| LEFT + (RIGHT - LEFT) * (ns.saturating_sub(t.start_ns) as f64 / span_ns as f64);
    let y_of = |n: u64| BOTTOM - (BOTTOM - TOP) * (n as f64 / y_max as f64);
    let bar_w = (RIGHT - LEFT) / buckets as f64;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(&t.title)
    );

    // Spans behind the bars (their labels come last, above everything).
    let span_x = |span: &Span| {
        let (x0, x1) = (x_of(span.start_ns), x_of(span.end_ns.max(span.start_ns)));
        (x0, (x1 - x0).max(SPAN_MIN_WIDTH))
    };
    let _ = writeln!(svg, "<g>");
    for span in &t.spans {
        let (x0, w) = span_x(span);
        let _ = writeln!(
            svg,
            r#"<rect x="{x0:.2}" y="{TOP}" width="{w:.2}" height="{:.2}" fill="{SPAN_COLOR}" fill-opacity="0.18"><title>{}</title></rect>"#,
            BOTTOM - TOP,
            escape(&span.label)
        );
    }
    let _ = writeln!(svg, "</g>");

    // Bars: one stack per bucket, in series order.
    let _ = writeln!(svg, "<g>");
    for b in 0..buckets {
        let mut below = 0u64;
        for (s, series) in order.iter().enumerate() {
            let n = counts.get(&(b, s)).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let y_top = y_of(below + n);
            let h = y_of(below) - y_top;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>{:.1} s: {n} replies from {}</title></rect>"#,
                LEFT + bar_w * b as f64,
                y_top,
                (bar_w - 0.5).max(0.5),
                h,
                color(*series),
                b as f64 * BUCKET_NS as f64 / 1e9,
                escape(series.unwrap_or("unknown server"))
            );
            below += n;
        }
    }
    let _ = writeln!(svg, "</g>");

    // Axes and ticks.
    let _ = writeln!(
        svg,
        r##"<path d="M{LEFT} {TOP} V{BOTTOM} H{RIGHT}" fill="none" stroke="#333"/>"##
    );
    let seconds = span_ns as f64 / 1e9;
    let tick_s = [1u64, 2, 5, 10, 20, 30, 60, 120, 300, 600]
        .into_iter()
        .find(|s| seconds / *s as f64 <= 15.0)
        .unwrap_or(600);
    let mut s = 0u64;
    while (s as f64) <= seconds {
        let x = x_of(t.start_ns + s * 1_000_000_000);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.2}" y1="{BOTTOM}" x2="{x:.2}" y2="{:.2}" stroke="#333"/><text x="{x:.2}" y="{:.2}" text-anchor="middle">{s} s</text>"##,
            BOTTOM + 5.0,
            BOTTOM + 19.0
        );
        s += tick_s;
    }
    for n in [0, y_max / 2, y_max] {
        let y = y_of(n);
        let _ = writeln!(
            svg,
            r##"<line x1="{:.2}" y1="{y:.2}" x2="{LEFT}" y2="{y:.2}" stroke="#333"/><text x="{:.2}" y="{:.2}" text-anchor="end">{n}</text>"##,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.2}" transform="rotate(-90 16 {:.2})" text-anchor="middle">replies per 100 ms</text>"#,
        (TOP + BOTTOM) / 2.0,
        (TOP + BOTTOM) / 2.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">time since start</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 36.0
    );

    // Markers, labels stacked from the top of the plot, all lines first so
    // that no line crosses another marker's label.
    let marker_color = |i: usize| MARKER_COLORS[i % MARKER_COLORS.len()];
    for (i, m) in t.markers.iter().enumerate() {
        let x = x_of(m.t_ns);
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{BOTTOM}" stroke="{}" stroke-width="1.5" stroke-dasharray="4 3"/>"#,
            marker_color(i)
        );
    }
    for (i, m) in t.markers.iter().enumerate() {
        let x = x_of(m.t_ns);
        let y = TOP + 12.0 + LABEL_STEP * i as f64;
        // Labels of markers near the right edge run leftwards.
        let (anchor, dx) = if x > LEFT + (RIGHT - LEFT) * 0.7 {
            ("end", -4.0)
        } else {
            ("start", 4.0)
        };
        let _ = writeln!(
            svg,
            r#"<text x="{:.2}" y="{y:.2}" text-anchor="{anchor}" fill="{}" stroke="white" stroke-width="3" paint-order="stroke">{}</text>"#,
            x + dx,
            marker_color(i),
            escape(&m.label)
        );
    }

    // Span labels at the foot of the plot, every other one a line higher
    // so that neighbours do not overlap.
    for (i, span) in t.spans.iter().enumerate() {
        let (x0, w) = span_x(span);
        let y = BOTTOM - 6.0 - LABEL_STEP * (i % 2) as f64;
        let (anchor, x) = if x0 > LEFT + (RIGHT - LEFT) * 0.7 {
            ("end", x0 + w - 2.0)
        } else {
            ("start", x0 + 2.0)
        };
        let _ = writeln!(
            svg,
            r#"<text x="{x:.2}" y="{y:.2}" text-anchor="{anchor}" fill="{SPAN_COLOR}" stroke="white" stroke-width="3" paint-order="stroke">{}</text>"#,
            escape(&span.label)
        );
    }

    // Legend.
    for (x, row, series) in legend {
        let y = HEIGHT - 22.0 + LEGEND_ROW * row as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.2}" y="{:.2}" width="12" height="12" fill="{}"/><text x="{:.2}" y="{y:.2}">{}</text>"#,
            y - 10.0,
            color(series),
            x + 16.0,
            escape(series.unwrap_or("unknown server"))
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The smallest 1, 2 or 5 times a power of ten that is at least `n`, so
/// that the axis ends on a round number.
fn nice_ceiling(n: u64) -> u64 {
    let mut p = 1u64;
    loop {
        for m in [1, 2, 5] {
            match p.checked_mul(m) {
                Some(v) if v >= n => return v,
                Some(_) => {}
                None => return n,
            }
        }
        match p.checked_mul(10) {
            Some(next) => p = next,
            None => return n,
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element is closed, in order, and returns the
    /// number of elements.
    fn balanced(svg: &str) -> usize {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = 0;
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("unterminated tag") + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                elements += 1;
                let name = tag
                    .split_whitespace()
                    .next()
                    .expect("empty tag")
                    .trim_end_matches('/');
                if !tag.ends_with('/') {
                    stack.push(name.to_owned());
                }
            }
            assert!(!rest.is_empty() || stack.is_empty(), "unclosed {stack:?}");
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        elements
    }

    fn sample() -> Timeline {
        let s = 1_700_000_000_000_000_000u64;
        let ms = |m: u64| s + m * 1_000_000;
        let mut replies = Vec::new();
        for i in 0..500 {
            replies.push(Reply {
                t_ns: ms(i * 10),
                server: Some("primary 127.0.0.1:4000".into()),
            });
        }
        for i in 0..400 {
            replies.push(Reply {
                t_ns: ms(5400 + i * 10),
                server: Some("backup 127.0.0.1:4001".into()),
            });
        }
        replies.push(Reply {
            t_ns: ms(20),
            server: None,
        });
        Timeline {
            title: "ftvm demo <seed 42> & friends".into(),
            start_ns: s,
            end_ns: ms(9500),
            replies,
            markers: vec![
                Marker {
                    t_ns: ms(5000),
                    label: "primary killed (SIGKILL)".into(),
                },
                Marker {
                    t_ns: ms(5301),
                    label: "failure detected +301 ms".into(),
                },
                Marker {
                    t_ns: ms(5303),
                    label: "test-and-set won +303 ms".into(),
                },
                Marker {
                    t_ns: ms(5305),
                    label: "backup live +305 ms".into(),
                },
                Marker {
                    t_ns: ms(5400),
                    label: "first reply from the new primary +400 ms".into(),
                },
            ],
            spans: vec![Span {
                start_ns: ms(6000),
                end_ns: ms(6004),
                label: "state transfer to spare3 <2.0 MiB>".into(),
            }],
        }
    }

    #[test]
    fn svg_is_balanced_with_labels_and_numbers() {
        let svg = render_svg(&sample());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(balanced(&svg) > 100);
        for label in [
            "primary killed (SIGKILL)",
            "failure detected +301 ms",
            "test-and-set won +303 ms",
            "backup live +305 ms",
            "first reply from the new primary +400 ms",
            "primary 127.0.0.1:4000",
            "backup 127.0.0.1:4001",
            "unknown server",
            "ftvm demo &lt;seed 42&gt; &amp; friends",
            "state transfer to spare3 &lt;2.0 MiB&gt;",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(svg.contains("9 s"));
        // Two colours for the two servers, one for the unknown one.
        assert!(svg.contains(SERIES_COLORS[0]) && svg.contains(SERIES_COLORS[1]));
        assert!(svg.contains(UNKNOWN_COLOR));
    }

    #[test]
    fn empty_timeline_renders_without_nan() {
        let svg = render_svg(&Timeline::default());
        balanced(&svg);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        let mut t = Timeline::default();
        t.markers.push(Marker {
            t_ns: 0,
            label: "alone".into(),
        });
        let svg = render_svg(&t);
        balanced(&svg);
        assert!(svg.contains("alone") && !svg.contains("NaN"));
    }

    #[test]
    fn a_long_legend_wraps_and_the_picture_grows() {
        let mut t = sample();
        let one_row = render_svg(&t);
        assert!(one_row.contains(r#"height="440""#), "{one_row}");
        for i in 0..6 {
            t.replies.push(Reply {
                t_ns: t.start_ns + i,
                server: Some(format!("vmm{i} (primary after kill {i}) 127.0.0.1:4000{i}")),
            });
        }
        let svg = render_svg(&t);
        balanced(&svg);
        assert!(!svg.contains(r#"height="440""#), "the legend did not wrap");
        assert!(svg.contains("vmm5 (primary after kill 5)"));
    }

    #[test]
    fn round_axis_ends() {
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(17), 20);
        assert_eq!(nice_ceiling(51), 100);
        assert_eq!(nice_ceiling(u64::MAX), u64::MAX);
    }
}
