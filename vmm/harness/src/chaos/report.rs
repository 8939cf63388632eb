//! A campaign's report: the summary table, `chaos.json`, and `chaos.svg`,
//! one row per trial with its faults and failover steps on a time axis and
//! failed trials in red.

use std::fmt::Write;

use serde::Serialize;

use super::schedule::ScheduleParams;
use super::verdict::TrialReport;

#[derive(Debug, Serialize)]
pub struct CampaignReport {
    /// The first trial's seed; trial i has seed + i.
    pub seed: u64,
    pub trials: u32,
    pub clients: u32,
    pub params: ScheduleParams,
    pub passed: u32,
    pub failed: u32,
    /// Every fault drawn, by kind.
    pub faults_by_kind: std::collections::BTreeMap<String, u64>,
    pub lost_writes: u64,
    pub non_linearizable_trials: u32,
    pub views_with_two_primaries: u32,
    pub divergences: u32,
    /// The slowest return to service after the last fault, in ms.
    pub max_live_again_ms: Option<f64>,
    /// With spares: the slowest `protected` after the last fault, in ms.
    pub max_reprotect_ms: Option<f64>,
    /// Faults not injected because they would have cost the last server
    /// holding the VM's state (or their moment never came).
    pub skipped: u32,
    /// Faults aimed at a state transfer, and how many struck before the
    /// primary reported the joiner protected.
    pub transfer_strikes: u32,
    pub transfer_hits: u32,
    /// Trials whose primary was killed mid-transfer (the VM down by design).
    pub down_by_design: u32,
    pub elapsed_s: f64,
    pub results: Vec<TrialReport>,
}

impl CampaignReport {
    pub fn new(
        seed: u64,
        clients: u32,
        params: ScheduleParams,
        results: Vec<TrialReport>,
        elapsed_s: f64,
    ) -> CampaignReport {
        let mut faults_by_kind = std::collections::BTreeMap::new();
        for f in results.iter().flat_map(|r| &r.faults) {
            *faults_by_kind.entry(f.kind.name().to_owned()).or_default() += 1;
        }
        let passed = results.iter().filter(|r| r.passed).count() as u32;
        CampaignReport {
            seed,
            trials: results.len() as u32,
            clients,
            params,
            passed,
            failed: results.len() as u32 - passed,
            faults_by_kind,
            lost_writes: results.iter().map(|r| r.lost_writes.len() as u64).sum(),
            non_linearizable_trials: results
                .iter()
                .filter(|r| !r.keys_not_linearizable.is_empty())
                .count() as u32,
            views_with_two_primaries: results
                .iter()
                .map(|r| {
                    r.primaries_per_view
                        .values()
                        .filter(|n| n.len() > 1)
                        .count() as u32
                })
                .sum(),
            divergences: results.iter().map(|r| r.diverged.len() as u32).sum(),
            max_live_again_ms: results
                .iter()
                .filter_map(|r| r.live_again_ms)
                .max_by(f64::total_cmp),
            max_reprotect_ms: results
                .iter()
                .filter_map(|r| r.reprotected_ms.flatten())
                .max_by(f64::total_cmp),
            skipped: results.iter().map(|r| r.skipped.len() as u32).sum(),
            transfer_strikes: results.iter().map(|r| r.strikes.len() as u32).sum(),
            transfer_hits: results
                .iter()
                .flat_map(|r| &r.strikes)
                .filter(|s| s.hit())
                .count() as u32,
            down_by_design: results.iter().filter(|r| r.down_by_design).count() as u32,
            elapsed_s,
            results,
        }
    }

    /// The table printed at the end.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>20}  {:>6}  {:>7}  {:>6}  {:>5}  {:>9}  {:>8}  {:>8}  verdict",
            "seed", "faults", "replies", "acked", "lost", "linear.", "1 prim.", "live ms"
        );
        for r in &self.results {
            let one_primary = r.primaries_per_view.values().all(|n| n.len() <= 1);
            let _ = writeln!(
                out,
                "{:>20}  {:>6}  {:>7}  {:>6}  {:>5}  {:>9}  {:>8}  {:>8}  {}",
                r.seed,
                r.faults.len(),
                r.ops_completed,
                r.writes_acknowledged,
                r.lost_writes.len(),
                if r.keys_not_linearizable.is_empty() {
                    "yes"
                } else {
                    "NO"
                },
                if one_primary { "yes" } else { "NO" },
                r.live_again_ms
                    .map_or("never".into(), |ms| format!("{ms:.0}")),
                if r.passed { "PASS" } else { "FAIL" }
            );
        }
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(out, "faults: {}", kinds.join(", "));
        let _ = writeln!(
            out,
            "{} of {} trials passed; {} lost acknowledged writes, {} non-linearizable trials, {} views with two primaries, {} divergences; slowest return to service {} (bound {:.0} ms); {:.0} s",
            self.passed,
            self.trials,
            self.lost_writes,
            self.non_linearizable_trials,
            self.views_with_two_primaries,
            self.divergences,
            self.max_live_again_ms
                .map_or("none".into(), |ms| format!("{ms:.0} ms")),
            self.results.first().map_or(0.0, |r| r.liveness_bound_ms),
            self.elapsed_s
        );
        let _ = writeln!(
            out,
            "faults during a state transfer: {} ({} struck before the joiner was protected); trials with the VM down by design (primary killed mid-transfer): {}; faults skipped (they would have cost the last server with the VM's state): {}; slowest re-protection after the last fault: {} (bound {:.1} s)",
            self.transfer_strikes,
            self.transfer_hits,
            self.down_by_design,
            self.skipped,
            self.max_reprotect_ms
                .map_or("none".into(), |ms| format!("{:.1} s", ms / 1000.0)),
            self.results.first().map_or(0.0, |r| r.reprotect_bound_ms) / 1000.0,
        );
        out
    }
}

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 190.0;
const RIGHT: f64 = 1080.0;
const TOP: f64 = 60.0;
const ROW: f64 = 24.0;

fn kind_color(name: &str) -> &'static str {
    match name {
        "kill" | "kill after output" => "#7f3c8d",
        "kill during cut" | "kill while backup paused" | "arbiter down in claim" => "#11a579",
        "pause" => "#3969ac",
        "cut" | "one-way cut" => "#f2b701",
        "delay" | "stall" => "#e68310",
        "datagrams" => "#80ba5a",
        n if n.ends_with("in transfer") => "#008695",
        _ => "#a5aa99",
    }
}

fn step_color(what: &str) -> &'static str {
    match what {
        "won" | "live" => "#1b7837",
        "diverged" => "#d62728",
        "failure_detected" => "#555555",
        _ => "#e08214",
    }
}

/// One row per trial: each fault a bar from its first to its last
/// injected action (a tick for an instant one), each failover step a
/// diamond; a failed trial's row is red, with its problems in the label's
/// tooltip.
pub fn render_svg(report: &CampaignReport) -> String {
    let span_ms = report
        .results
        .iter()
        .map(|r| r.load_s * 1000.0)
        .fold(1000.0, f64::max);
    let x = |ms: f64| LEFT + (RIGHT - LEFT) * (ms.max(0.0) / span_ms).min(1.0);
    let height = TOP + ROW * report.results.len() as f64 + 70.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="10" y="22" font-size="14" font-weight="bold">ftvm chaos: seed {}, {} trials, {} passed, {} failed</text>"#,
        report.seed, report.trials, report.passed, report.failed
    );
    let mut s = 0.0;
    while s * 1000.0 <= span_ms {
        let xs = x(s * 1000.0);
        let _ = writeln!(
            svg,
            r##"<line x1="{xs:.1}" y1="{:.1}" x2="{xs:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xs:.1}" y="{:.1}" text-anchor="middle">{s} s</text>"##,
            TOP - 6.0,
            TOP + ROW * report.results.len() as f64,
            TOP - 10.0
        );
        s += if span_ms > 30_000.0 { 5.0 } else { 1.0 };
    }
    for (i, r) in report.results.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        if !r.passed {
            let _ = writeln!(
                svg,
                r##"<rect x="0" y="{y:.1}" width="{WIDTH}" height="{ROW}" fill="#fde0e0"/>"##
            );
        }
        let color = if r.passed { "#222" } else { "#d62728" };
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}" fill="{color}">seed {} {}<title>{}</title></text>"#,
            y + ROW * 0.65,
            r.seed,
            if r.passed { "PASS" } else { "FAIL" },
            escape(&r.problems.join("; "))
        );
        for (n, f) in r.faults.iter().enumerate() {
            let times: Vec<f64> = r
                .injected
                .iter()
                .filter(|a| a.fault == n)
                .map(|a| a.t_ms)
                .collect();
            let (from, to) = match (times.first(), times.last()) {
                (Some(a), Some(b)) => (*a, *b),
                _ => (f.at_ms as f64, f.at_ms as f64),
            };
            let (x0, x1) = (x(from), x(to).max(x(from) + 2.0));
            let _ = writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}" opacity="0.8"><title>{}</title></rect>"#,
                y + 4.0 + (n % 3) as f64 * 4.0,
                x1 - x0,
                6.0,
                kind_color(f.kind.name()),
                escape(&f.to_string())
            );
        }
        for step in &r.steps {
            let xs = x(step.t_ms);
            let ys = y + ROW - 5.0;
            let _ = writeln!(
                svg,
                r#"<path d="M{xs:.1} {:.1} l4 4 l-4 4 l-4 -4 z" fill="{}"><title>{:.0} ms: {} {}</title></path>"#,
                ys - 4.0,
                step_color(&step.what),
                step.t_ms,
                escape(&step.server),
                step.what
            );
        }
    }
    let legend_y = TOP + ROW * report.results.len() as f64 + 30.0;
    let mut lx = 10.0;
    for (label, color) in [
        ("kill", kind_color("kill")),
        ("worst moment", kind_color("kill during cut")),
        ("pause", kind_color("pause")),
        ("cut", kind_color("cut")),
        ("delay/stall", kind_color("stall")),
        ("datagrams", kind_color("datagrams")),
        ("won/live", step_color("won")),
        ("lost/deposed", step_color("lost")),
        ("diverged", step_color("diverged")),
    ] {
        let _ = writeln!(
            svg,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{legend_y:.1}">{label}</text>"#,
            legend_y - 9.0,
            lx + 14.0
        );
        lx += 24.0 + 7.0 * label.len() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
