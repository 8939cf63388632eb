//! Ethernet II / IPv4 / UDP: parsing what the VMM delivers and building the
//! headers of replies. Every length here comes from outside the guest, so
//! each is checked before it is used, and anything unexpected is refused.

pub const ETH_HEADER_LEN: usize = 14;
const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// Ethernet + IPv4 without options + UDP: the headers of every reply.
pub const HEADERS_LEN: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
/// The largest Ethernet frame without FCS.
pub const MAX_FRAME_LEN: usize = 1514;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IP_PROTO_UDP: u8 = 17;
/// The More-Fragments flag and the fragment offset.
const FRAGMENT_MASK: u16 = 0x3fff;
const DONT_FRAGMENT: u16 = 0x4000;
const TTL: u8 = 64;

/// Where a datagram came from and went to.
#[derive(Clone, Copy)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

impl Endpoints {
    /// The endpoints of the answer: source and destination exchanged.
    pub fn reversed(&self) -> Endpoints {
        Endpoints {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// The UDP payload of `frame` and its endpoints, if the frame is an
/// unfragmented IPv4/UDP datagram to `ip`:`port` with a valid IPv4 header
/// checksum and consistent lengths. The UDP checksum is not verified: the
/// VMM may send 0, and a virtual wire does not corrupt frames.
#[inline(never)]
pub fn parse_udp(frame: &[u8], ip: [u8; 4], port: u16) -> Option<(Endpoints, &[u8])> {
    if frame.len() < HEADERS_LEN || frame[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    let packet = &frame[ETH_HEADER_LEN..];
    if packet[0] >> 4 != 4 {
        return None;
    }
    let header_len = (packet[0] & 0xf) as usize * 4;
    let total_len = be16(packet, 2) as usize;
    // Ethernet may pad short frames, so the packet may be longer than its
    // total length, never shorter.
    if header_len < IPV4_HEADER_LEN
        || total_len < header_len + UDP_HEADER_LEN
        || total_len > packet.len()
        || be16(packet, 6) & FRAGMENT_MASK != 0
        || packet[9] != IP_PROTO_UDP
        || packet[16..20] != ip
        || checksum(&packet[..header_len]) != 0
    {
        return None;
    }
    let udp = &packet[header_len..total_len];
    let udp_len = be16(udp, 4) as usize;
    if udp_len < UDP_HEADER_LEN || udp_len > udp.len() || be16(udp, 2) != port {
        return None;
    }
    let mut endpoints = Endpoints {
        src_mac: [0; 6],
        dst_mac: [0; 6],
        src_ip: [0; 4],
        dst_ip: ip,
        src_port: be16(udp, 0),
        dst_port: port,
    };
    endpoints.dst_mac.copy_from_slice(&frame[0..6]);
    endpoints.src_mac.copy_from_slice(&frame[6..12]);
    endpoints.src_ip.copy_from_slice(&packet[12..16]);
    Some((endpoints, &udp[UDP_HEADER_LEN..udp_len]))
}

/// Writes the Ethernet, IPv4 and UDP headers of a frame from `to.src_*` to
/// `to.dst_*` carrying `payload_len` bytes into `frame[..HEADERS_LEN]`.
/// Returns the frame length, or None if the payload does not fit a frame.
#[inline(never)]
pub fn write_headers(frame: &mut [u8], to: &Endpoints, payload_len: usize) -> Option<usize> {
    let frame_len = HEADERS_LEN + payload_len;
    if frame_len > MAX_FRAME_LEN || frame.len() < HEADERS_LEN {
        return None;
    }
    frame[0..6].copy_from_slice(&to.dst_mac);
    frame[6..12].copy_from_slice(&to.src_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV4);

    let ip_len = (IPV4_HEADER_LEN + UDP_HEADER_LEN + payload_len) as u16;
    let ip = &mut frame[ETH_HEADER_LEN..ETH_HEADER_LEN + IPV4_HEADER_LEN];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&DONT_FRAGMENT.to_be_bytes());
    ip[8] = TTL;
    ip[9] = IP_PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&to.src_ip);
    ip[16..20].copy_from_slice(&to.dst_ip);
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let udp = &mut frame[ETH_HEADER_LEN + IPV4_HEADER_LEN..HEADERS_LEN];
    udp[0..2].copy_from_slice(&to.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&to.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_HEADER_LEN + payload_len) as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    Some(frame_len)
}

/// The Internet checksum (RFC 1071) of `data`: the value to store in a zeroed
/// checksum field, or 0 when run over a header whose checksum is correct.
#[inline(never)]
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u16::from_be_bytes([word[0], word[1]]) as u32;
    }
    if let [last] = words.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}
