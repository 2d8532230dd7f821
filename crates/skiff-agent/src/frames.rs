//! Frame encoding and blocking I/O on the host channel (before the async runtime starts, and
//! on the channel threads). The channel is a unix socket or, in a microVM, a virtio-serial
//! character device: only plain `read`/`write` work on both.

use skiff_core::protocol::Frame;
use std::io::{self, Read, Write};

pub(crate) use skiff_core::protocol::encode_parts as encode;

/// Reads one frame; `None` on a clean EOF before the frame starts.
pub(crate) fn read_blocking(chan: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut prefix = [0u8; 4];
    match chan.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = Frame::rest_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut rest = vec![0u8; n];
    chan.read_exact(&mut rest)?;
    Frame::decode_rest(rest)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes an encoded frame.
pub(crate) fn write_blocking(chan: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    chan.write_all(bytes)
}
