//! A packet capture of the frames a guest transmits, in the classic pcap
//! format that tcpdump, tshark and Wireshark read; record and replay write
//! one each so that their reply frames can be compared byte for byte.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
const LINKTYPE_ETHERNET: u32 = 1;
const SNAPLEN: u32 = 65535;

pub struct Capture {
    out: BufWriter<File>,
}

impl Capture {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&PCAP_MAGIC.to_le_bytes())?;
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&SNAPLEN.to_le_bytes())?;
        out.write_all(&LINKTYPE_ETHERNET.to_le_bytes())?;
        Ok(Capture { out })
    }

    pub fn write(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.out.write_all(&(now.as_secs() as u32).to_le_bytes())?;
        self.out.write_all(&now.subsec_micros().to_le_bytes())?;
        let len = frame.len() as u32;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(frame)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The frames of a capture written by [`Capture`], without timestamps.
pub fn read_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if bytes.len() < 24 || bytes[0..4] != PCAP_MAGIC.to_le_bytes() {
        return Err("not a little-endian pcap file".into());
    }
    let mut frames = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 16)
            .ok_or_else(|| format!("record header cut at byte {at}"))?;
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let data = bytes
            .get(at + 16..at + 16 + len)
            .ok_or_else(|| format!("record at byte {at} needs {len} bytes"))?;
        frames.push(data.to_vec());
        at += 16 + len;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_capture_file() {
        let dir = std::env::temp_dir().join(format!("ftvm-capture-{}", std::process::id()));
        let mut c = Capture::create(&dir).expect("create");
        c.write(b"first frame").expect("write");
        c.write(&[0u8; 60]).expect("write");
        c.flush().expect("flush");
        let bytes = std::fs::read(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        let frames = read_frames(&bytes).expect("parse");
        assert_eq!(frames, vec![b"first frame".to_vec(), vec![0u8; 60]]);
        assert!(read_frames(&bytes[..bytes.len() - 1]).is_err());
    }
}
