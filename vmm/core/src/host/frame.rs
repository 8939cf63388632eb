//! Ethernet/IPv4/UDP frames between the VMM's UDP backend and the guest.
//!
//! The backend only ever speaks UDP over IPv4 to one guest (docs/guest-abi.md,
//! "Network"), so this is not a general network stack: [`wrap_udp`] builds the
//! one frame shape the VMM sends, and [`unwrap_udp`] accepts exactly the
//! frames it can forward and names precisely what is wrong with the rest.
//! Both are pure functions of their inputs, as replay requires.

use std::net::{Ipv4Addr, SocketAddrV4};

use thiserror::Error;

/// The guest's MAC address (also in the boot-info block and the virtio-net
/// config space).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The MAC address the VMM's backend uses for every frame it sends.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x02];
/// The guest's IPv4 address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's UDP port for the key-value service.
pub const GUEST_SERVICE_PORT: u16 = 7000;

/// Ethernet header: destination MAC, source MAC, ethertype.
pub const ETH_HEADER_LEN: usize = 14;
/// IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// The largest frame without FCS on a 1500-byte MTU link.
pub const MAX_FRAME_LEN: usize = 1514;
/// The largest UDP payload that fits in [`MAX_FRAME_LEN`] without IP options.
pub const MAX_UDP_PAYLOAD: usize =
    MAX_FRAME_LEN - ETH_HEADER_LEN - IPV4_HEADER_LEN - UDP_HEADER_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IP_PROTO_UDP: u8 = 17;
const IP_FLAG_DF: u16 = 0x4000;
const IP_FLAG_MF: u16 = 0x2000;
const IP_FRAG_OFFSET_MASK: u16 = 0x1fff;
const DEFAULT_TTL: u8 = 64;

/// Why a frame is not an IPv4/UDP frame the backend can forward.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame too short for the {what}: need {need} bytes, have {have}")]
    TooShort {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("not IPv4: ethertype {ethertype:#06x}")]
    NotIpv4 { ethertype: u16 },
    #[error("bad IPv4 version {version} (expected 4)")]
    BadIpVersion { version: u8 },
    #[error("bad IPv4 header length: IHL {ihl} words (at least 5)")]
    BadIhl { ihl: u8 },
    #[error("bad IPv4 header checksum: expected {expected:#06x}, found {found:#06x}")]
    BadIpChecksum { expected: u16, found: u16 },
    #[error(
        "IPv4 packet is a fragment (more fragments: {more_fragments}, offset {offset} x 8 bytes)"
    )]
    Fragmented { more_fragments: bool, offset: u16 },
    #[error("not UDP: IPv4 protocol {protocol}")]
    NotUdp { protocol: u8 },
    #[error(
        "IPv4 total length {total_length} inconsistent with the frame: header is {header_len} \
         bytes, {available} bytes follow the Ethernet header"
    )]
    IpLengthMismatch {
        total_length: u16,
        header_len: usize,
        available: usize,
    },
    #[error("UDP length {udp_length} inconsistent with the IPv4 payload of {ip_payload} bytes")]
    UdpLengthMismatch { udp_length: u16, ip_payload: usize },
    #[error("bad UDP checksum: expected {expected:#06x}, found {found:#06x}")]
    BadUdpChecksum { expected: u16, found: u16 },
    #[error("UDP payload too long: {len} bytes, at most {max}")]
    PayloadTooLong { len: usize, max: usize },
}

/// A parsed Ethernet/IPv4/UDP frame, borrowing its payload from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: &'a [u8],
}

/// An Ethernet/IPv4/UDP frame carrying `payload` from `src` to `dst` (IPv4
/// header checksum set, UDP checksum 0, TTL 64, DF, id 0).
///
/// The UDP checksum is left at 0 (allowed over IPv4) because the frame only
/// crosses guest memory, where nothing can corrupt it.
pub fn wrap_udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return Err(FrameError::PayloadTooLong {
            len: payload.len(),
            max: MAX_UDP_PAYLOAD,
        });
    }
    // Both fit in u16: the payload is at most MAX_UDP_PAYLOAD.
    let udp_len = (UDP_HEADER_LEN + payload.len()) as u16;
    let ip_total = IPV4_HEADER_LEN as u16 + udp_len;

    let mut frame = Vec::with_capacity(ETH_HEADER_LEN + usize::from(ip_total));
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

    let ip_start = frame.len();
    frame.push(0x45); // version 4, IHL 5
    frame.push(0); // DSCP/ECN
    frame.extend_from_slice(&ip_total.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes()); // identification
    frame.extend_from_slice(&IP_FLAG_DF.to_be_bytes());
    frame.push(DEFAULT_TTL);
    frame.push(IP_PROTO_UDP);
    frame.extend_from_slice(&0u16.to_be_bytes()); // checksum, set below
    frame.extend_from_slice(&src.ip().octets());
    frame.extend_from_slice(&dst.ip().octets());
    let checksum = internet_checksum(&frame[ip_start..], 0);
    frame[ip_start + 10..ip_start + 12].copy_from_slice(&checksum.to_be_bytes());

    frame.extend_from_slice(&src.port().to_be_bytes());
    frame.extend_from_slice(&dst.port().to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Parses an Ethernet/IPv4/UDP frame, checking every header field the
/// backend relies on. Bytes after the IPv4 total length (Ethernet padding)
/// are ignored.
pub fn unwrap_udp(frame: &[u8]) -> Result<UdpFrame<'_>, FrameError> {
    need(frame, ETH_HEADER_LEN, "Ethernet header")?;
    let ethertype = be16(frame, 12);
    if ethertype != ETHERTYPE_IPV4 {
        return Err(FrameError::NotIpv4 { ethertype });
    }

    let ip = &frame[ETH_HEADER_LEN..];
    need(ip, IPV4_HEADER_LEN, "IPv4 header").map_err(|e| shifted(e, ETH_HEADER_LEN))?;
    let version = ip[0] >> 4;
    if version != 4 {
        return Err(FrameError::BadIpVersion { version });
    }
    let ihl = ip[0] & 0x0f;
    if ihl < 5 {
        return Err(FrameError::BadIhl { ihl });
    }
    let header_len = usize::from(ihl) * 4;
    need(ip, header_len, "IPv4 header with options").map_err(|e| shifted(e, ETH_HEADER_LEN))?;
    let header = &ip[..header_len];

    let found = be16(header, 10);
    let expected = checksum_with_zeroed_field(header, 10, 0);
    if internet_checksum(header, 0) != 0 {
        return Err(FrameError::BadIpChecksum { expected, found });
    }

    let total_length = be16(header, 2);
    let total = usize::from(total_length);
    if total < header_len || total > ip.len() {
        return Err(FrameError::IpLengthMismatch {
            total_length,
            header_len,
            available: ip.len(),
        });
    }

    let flags_fragment = be16(header, 6);
    let offset = flags_fragment & IP_FRAG_OFFSET_MASK;
    let more_fragments = flags_fragment & IP_FLAG_MF != 0;
    if more_fragments || offset != 0 {
        return Err(FrameError::Fragmented {
            more_fragments,
            offset,
        });
    }

    let protocol = header[9];
    if protocol != IP_PROTO_UDP {
        return Err(FrameError::NotUdp { protocol });
    }
    let src_ip = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst_ip = Ipv4Addr::new(header[16], header[17], header[18], header[19]);

    let udp = &ip[header_len..total];
    need(
        udp,
        UDP_HEADER_LEN,
        "UDP header (within the IPv4 total length)",
    )
    .map_err(|e| shifted(e, ETH_HEADER_LEN + header_len))?;
    let udp_length = be16(udp, 4);
    if usize::from(udp_length) < UDP_HEADER_LEN || usize::from(udp_length) > udp.len() {
        return Err(FrameError::UdpLengthMismatch {
            udp_length,
            ip_payload: udp.len(),
        });
    }
    let udp = &udp[..usize::from(udp_length)];

    let found = be16(udp, 6);
    if found != 0 {
        let pseudo = pseudo_header_sum(src_ip, dst_ip, udp_length);
        let expected = match checksum_with_zeroed_field(udp, 6, pseudo) {
            // A computed 0 is sent as 0xffff, since 0 means "no checksum".
            0 => 0xffff,
            c => c,
        };
        if internet_checksum(udp, pseudo) != 0 {
            return Err(FrameError::BadUdpChecksum { expected, found });
        }
    }

    Ok(UdpFrame {
        src_mac: mac_at(frame, 6),
        dst_mac: mac_at(frame, 0),
        src: SocketAddrV4::new(src_ip, be16(udp, 0)),
        dst: SocketAddrV4::new(dst_ip, be16(udp, 2)),
        payload: &udp[UDP_HEADER_LEN..],
    })
}

fn need(bytes: &[u8], need: usize, what: &'static str) -> Result<(), FrameError> {
    if bytes.len() < need {
        return Err(FrameError::TooShort {
            what,
            need,
            have: bytes.len(),
        });
    }
    Ok(())
}

/// Reports a shortness found in an inner header in terms of the whole frame,
/// which is what a reader of the error can compare with the frame length.
fn shifted(e: FrameError, offset: usize) -> FrameError {
    match e {
        FrameError::TooShort { what, need, have } => FrameError::TooShort {
            what,
            need: need + offset,
            have: have + offset,
        },
        other => other,
    }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn mac_at(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    mac
}

/// The ones' complement sum of the IPv4 pseudo-header that the UDP checksum
/// covers, not yet folded or complemented.
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_length: u16) -> u32 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = IP_PROTO_UDP;
    pseudo[10..12].copy_from_slice(&udp_length.to_be_bytes());
    ones_complement_sum(&pseudo, 0)
}

/// The RFC 1071 checksum of `bytes` plus an initial partial sum. Over data
/// whose checksum field is correct it yields 0.
fn internet_checksum(bytes: &[u8], initial: u32) -> u16 {
    !fold(ones_complement_sum(bytes, initial))
}

/// What the checksum field at `field` should hold: the checksum computed as
/// if that field were zero.
fn checksum_with_zeroed_field(bytes: &[u8], field: usize, initial: u32) -> u16 {
    let stored = u32::from(be16(bytes, field));
    // Subtracting the stored field in ones' complement arithmetic is adding
    // its complement.
    internet_checksum(bytes, initial + (!stored & 0xffff))
}

fn ones_complement_sum(bytes: &[u8], initial: u32) -> u32 {
    let mut sum = u64::from(initial);
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 7), 40000)
    }

    fn guest() -> SocketAddrV4 {
        SocketAddrV4::new(GUEST_IP, GUEST_SERVICE_PORT)
    }

    fn sample() -> Vec<u8> {
        wrap_udp(GATEWAY_MAC, GUEST_MAC, client(), guest(), b"hello").unwrap()
    }

    const IP: usize = ETH_HEADER_LEN;
    const UDP: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN;

    fn fix_ip_checksum(frame: &mut [u8]) {
        let ihl = usize::from(frame[IP] & 0x0f) * 4;
        frame[IP + 10..IP + 12].fill(0);
        let c = internet_checksum(&frame[IP..IP + ihl], 0);
        frame[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
    }

    /// Sets a correct, non-zero UDP checksum, as a sender that computes
    /// checksums would.
    fn set_udp_checksum(frame: &mut [u8]) {
        let ihl = usize::from(frame[IP] & 0x0f) * 4;
        let udp_start = IP + ihl;
        let src = Ipv4Addr::new(
            frame[IP + 12],
            frame[IP + 13],
            frame[IP + 14],
            frame[IP + 15],
        );
        let dst = Ipv4Addr::new(
            frame[IP + 16],
            frame[IP + 17],
            frame[IP + 18],
            frame[IP + 19],
        );
        let udp_len = be16(frame, udp_start + 4);
        let udp = udp_start..udp_start + usize::from(udp_len);
        frame[udp_start + 6..udp_start + 8].fill(0);
        let c = match internet_checksum(&frame[udp.clone()], pseudo_header_sum(src, dst, udp_len)) {
            0 => 0xffff,
            c => c,
        };
        frame[udp_start + 6..udp_start + 8].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn wrap_produces_the_documented_layout() {
        let f = sample();
        assert_eq!(f.len(), 14 + 20 + 8 + 5);
        assert_eq!(&f[0..6], &GUEST_MAC);
        assert_eq!(&f[6..12], &GATEWAY_MAC);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[IP], 0x45);
        assert_eq!(be16(&f, IP + 2), 33);
        assert_eq!(be16(&f, IP + 4), 0, "id 0");
        assert_eq!(be16(&f, IP + 6), 0x4000, "DF, offset 0");
        assert_eq!(f[IP + 8], 64, "TTL");
        assert_eq!(f[IP + 9], 17);
        assert_eq!(internet_checksum(&f[IP..UDP], 0), 0, "header checksum");
        assert_eq!(&f[IP + 12..IP + 16], &[192, 168, 1, 7]);
        assert_eq!(&f[IP + 16..IP + 20], &[10, 0, 2, 15]);
        assert_eq!(be16(&f, UDP), 40000);
        assert_eq!(be16(&f, UDP + 2), 7000);
        assert_eq!(be16(&f, UDP + 4), 13);
        assert_eq!(be16(&f, UDP + 6), 0, "UDP checksum 0");
        assert_eq!(&f[UDP + 8..], b"hello");
    }

    #[test]
    fn known_ip_checksum() {
        // The worked example of Wikipedia's "Internet checksum" article.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header, 0), 0xb861);
    }

    #[test]
    fn maximum_payload_fills_a_maximum_frame() {
        let payload = vec![0xab; MAX_UDP_PAYLOAD];
        let f = wrap_udp(GUEST_MAC, GATEWAY_MAC, guest(), client(), &payload).unwrap();
        assert_eq!(f.len(), MAX_FRAME_LEN);
        assert_eq!(unwrap_udp(&f).unwrap().payload, &payload[..]);
    }

    #[test]
    fn payload_too_long() {
        let payload = vec![0; MAX_UDP_PAYLOAD + 1];
        assert_eq!(
            wrap_udp(GUEST_MAC, GATEWAY_MAC, guest(), client(), &payload),
            Err(FrameError::PayloadTooLong {
                len: MAX_UDP_PAYLOAD + 1,
                max: MAX_UDP_PAYLOAD
            })
        );
    }

    #[test]
    fn empty_payload_round_trips() {
        let f = wrap_udp(GUEST_MAC, GATEWAY_MAC, guest(), client(), &[]).unwrap();
        assert_eq!(unwrap_udp(&f).unwrap().payload, &[] as &[u8]);
    }

    #[test]
    fn valid_udp_checksum_is_accepted() {
        for payload in [&b"odd"[..], b"even", b""] {
            let mut f = wrap_udp(GATEWAY_MAC, GUEST_MAC, client(), guest(), payload).unwrap();
            set_udp_checksum(&mut f);
            assert_ne!(be16(&f, UDP + 6), 0);
            assert_eq!(unwrap_udp(&f).unwrap().payload, payload);
        }
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let mut f = sample();
        f.resize(60, 0);
        let u = unwrap_udp(&f).unwrap();
        assert_eq!(u.payload, b"hello");
    }

    #[test]
    fn ip_options_are_skipped() {
        let mut f = sample();
        // Insert 4 bytes of options (NOP x3, EOL) after the fixed header.
        f.splice(UDP..UDP, [1, 1, 1, 0]);
        f[IP] = 0x46;
        let total = be16(&f, IP + 2) + 4;
        f[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
        fix_ip_checksum(&mut f);
        let u = unwrap_udp(&f).unwrap();
        assert_eq!(u.payload, b"hello");
        assert_eq!(u.dst, guest());
    }

    #[test]
    fn too_short_for_each_header() {
        assert_eq!(
            unwrap_udp(&[0; 5]),
            Err(FrameError::TooShort {
                what: "Ethernet header",
                need: 14,
                have: 5
            })
        );
        let f = sample();
        assert_eq!(
            unwrap_udp(&f[..20]),
            Err(FrameError::TooShort {
                what: "IPv4 header",
                need: 34,
                have: 20
            })
        );

        let mut opts = f.clone();
        opts[IP] = 0x4f;
        assert_eq!(
            unwrap_udp(&opts[..40]),
            Err(FrameError::TooShort {
                what: "IPv4 header with options",
                need: 14 + 60,
                have: 40
            })
        );

        // An IPv4 total length that leaves no room for the UDP header.
        let mut short = f.clone();
        short[IP + 2..IP + 4].copy_from_slice(&24u16.to_be_bytes());
        fix_ip_checksum(&mut short);
        assert_eq!(
            unwrap_udp(&short),
            Err(FrameError::TooShort {
                what: "UDP header (within the IPv4 total length)",
                need: 42,
                have: 38
            })
        );
    }

    #[test]
    fn not_ipv4() {
        let mut f = sample();
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::NotIpv4 { ethertype: 0x86dd })
        );
        assert_eq!(
            FrameError::NotIpv4 { ethertype: 0x0806 }.to_string(),
            "not IPv4: ethertype 0x0806"
        );
    }

    #[test]
    fn bad_version_and_ihl() {
        let mut f = sample();
        f[IP] = 0x65;
        assert_eq!(unwrap_udp(&f), Err(FrameError::BadIpVersion { version: 6 }));
        f[IP] = 0x44;
        assert_eq!(unwrap_udp(&f), Err(FrameError::BadIhl { ihl: 4 }));
    }

    #[test]
    fn bad_ip_checksum_names_both_values() {
        let mut f = sample();
        let good = be16(&f, IP + 10);
        f[IP + 10..IP + 12].copy_from_slice(&(good ^ 0x0101).to_be_bytes());
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::BadIpChecksum {
                expected: good,
                found: good ^ 0x0101
            })
        );
        // A corrupted field elsewhere also shows up as a checksum mismatch.
        let mut f = sample();
        f[IP + 8] = 1;
        assert!(matches!(
            unwrap_udp(&f),
            Err(FrameError::BadIpChecksum { found, .. }) if found == good
        ));
    }

    #[test]
    fn fragments_are_refused() {
        let mut f = sample();
        f[IP + 6..IP + 8].copy_from_slice(&0x2000u16.to_be_bytes());
        fix_ip_checksum(&mut f);
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::Fragmented {
                more_fragments: true,
                offset: 0
            })
        );
        f[IP + 6..IP + 8].copy_from_slice(&0x0003u16.to_be_bytes());
        fix_ip_checksum(&mut f);
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::Fragmented {
                more_fragments: false,
                offset: 3
            })
        );
    }

    #[test]
    fn not_udp() {
        let mut f = sample();
        f[IP + 9] = 6;
        fix_ip_checksum(&mut f);
        assert_eq!(unwrap_udp(&f), Err(FrameError::NotUdp { protocol: 6 }));
    }

    #[test]
    fn ip_total_length_inconsistent() {
        let mut f = sample();
        f[IP + 2..IP + 4].copy_from_slice(&1000u16.to_be_bytes());
        fix_ip_checksum(&mut f);
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::IpLengthMismatch {
                total_length: 1000,
                header_len: 20,
                available: 33
            })
        );
        f[IP + 2..IP + 4].copy_from_slice(&10u16.to_be_bytes());
        fix_ip_checksum(&mut f);
        assert!(matches!(
            unwrap_udp(&f),
            Err(FrameError::IpLengthMismatch {
                total_length: 10,
                ..
            })
        ));
    }

    #[test]
    fn udp_length_inconsistent() {
        let mut f = sample();
        f[UDP + 4..UDP + 6].copy_from_slice(&14u16.to_be_bytes());
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::UdpLengthMismatch {
                udp_length: 14,
                ip_payload: 13
            })
        );
        f[UDP + 4..UDP + 6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::UdpLengthMismatch {
                udp_length: 7,
                ip_payload: 13
            })
        );
    }

    #[test]
    fn bad_udp_checksum_names_both_values() {
        let mut f = sample();
        set_udp_checksum(&mut f);
        let good = be16(&f, UDP + 6);
        let bad: u16 = if good == 0x1234 { 0x4321 } else { 0x1234 };
        f[UDP + 6..UDP + 8].copy_from_slice(&bad.to_be_bytes());
        assert_eq!(
            unwrap_udp(&f),
            Err(FrameError::BadUdpChecksum {
                expected: good,
                found: bad
            })
        );
        // Corrupting the payload under a correct checksum is caught too.
        let mut f = sample();
        set_udp_checksum(&mut f);
        *f.last_mut().unwrap() ^= 0xff;
        assert!(matches!(
            unwrap_udp(&f),
            Err(FrameError::BadUdpChecksum { found, .. }) if found == good
        ));
    }

    fn socket() -> impl Strategy<Value = SocketAddrV4> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(ip.into(), port))
    }

    proptest! {
        // Failures are reported, not written to a regressions file.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn round_trip(
            src_mac in any::<[u8; 6]>(),
            dst_mac in any::<[u8; 6]>(),
            src in socket(),
            dst in socket(),
            payload in proptest::collection::vec(any::<u8>(), 0..=MAX_UDP_PAYLOAD),
            with_checksum in any::<bool>(),
        ) {
            let mut f = wrap_udp(src_mac, dst_mac, src, dst, &payload).unwrap();
            prop_assert!(f.len() <= MAX_FRAME_LEN);
            if with_checksum {
                set_udp_checksum(&mut f);
            }
            let u = unwrap_udp(&f).unwrap();
            prop_assert_eq!(u, UdpFrame { src_mac, dst_mac, src, dst, payload: &payload });
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = unwrap_udp(&bytes);
        }

        #[test]
        fn corrupted_frames_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            truncate in any::<prop::sample::Index>(),
            fix in any::<bool>(),
        ) {
            let mut f = wrap_udp(GATEWAY_MAC, GUEST_MAC, client(), guest(), &payload).unwrap();
            for (i, v) in edits {
                let at = i.index(f.len());
                f[at] = v;
            }
            if fix && f[IP] & 0x0f >= 5 && f.len() >= IP + usize::from(f[IP] & 0x0f) * 4 {
                // Get past the checksum so the later checks see garbage too.
                fix_ip_checksum(&mut f);
            }
            let cut = truncate.index(f.len() + 1);
            let _ = unwrap_udp(&f[..cut]);
            let _ = unwrap_udp(&f);
        }
    }
}
