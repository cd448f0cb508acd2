//! Protocol messages on a QUIC stream: each one prefixed with its length (u32,
//! little-endian), and split back into messages as the stream's bytes arrive, in
//! pieces of any size.

use bytes::{Buf, Bytes, BytesMut};

/// The largest message a frame may announce: the largest inagg message, which is the
/// largest UDP payload (65,507 bytes, which the decoder enforces and to which the
/// aggregator holds every job's chunks, on streams too). A larger length is garbage
/// and ends the connection.
pub(crate) const MAX_FRAME: usize = inagg_proto::wire::MAX_DATAGRAM;

/// Bytes of the length prefix.
pub(crate) const PREFIX: usize = 4;

/// The length prefix of a message of `len` bytes.
pub(crate) fn prefix(len: usize) -> [u8; PREFIX] {
    (len as u32).to_le_bytes()
}

/// Frames a message whole: its prefix, then its bytes.
pub(crate) fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(PREFIX + msg.len());
    b.extend_from_slice(&prefix(msg.len()));
    b.extend_from_slice(msg);
    b.freeze()
}

/// A frame announced a length over [`MAX_FRAME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLarge;

/// Splits a stream's bytes into messages. Whole frames inside one piece are handed on
/// where they lie; only a frame cut across pieces is gathered (one copy).
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    partial: BytesMut,
}

impl FrameReader {
    /// Takes the next piece of the stream; hands every message it completes to
    /// `deliver`, and returns how many.
    pub(crate) fn push(
        &mut self,
        mut piece: Bytes,
        deliver: &mut impl FnMut(&[u8]),
    ) -> Result<usize, TooLarge> {
        let mut n = 0;
        if !self.partial.is_empty() {
            // Complete the gathered frame first: its prefix, then its body.
            if self.partial.len() < PREFIX {
                let take = (PREFIX - self.partial.len()).min(piece.len());
                self.partial.extend_from_slice(&piece[..take]);
                piece.advance(take);
                if self.partial.len() < PREFIX {
                    return Ok(0);
                }
            }
            let want = PREFIX + announced(&self.partial)?;
            let take = (want - self.partial.len()).min(piece.len());
            self.partial.extend_from_slice(&piece[..take]);
            piece.advance(take);
            if self.partial.len() < want {
                return Ok(0);
            }
            deliver(&self.partial[PREFIX..]);
            self.partial.clear();
            n += 1;
        }
        while piece.len() >= PREFIX {
            let len = announced(&piece)?;
            if piece.len() < PREFIX + len {
                break;
            }
            deliver(&piece[PREFIX..PREFIX + len]);
            piece.advance(PREFIX + len);
            n += 1;
        }
        self.partial.extend_from_slice(&piece);
        Ok(n)
    }
}

/// The length announced by the prefix at the start of `b` (at least [`PREFIX`] bytes).
fn announced(b: &[u8]) -> Result<usize, TooLarge> {
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if len > MAX_FRAME {
        Err(TooLarge)
    } else {
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames cut at every possible place come back whole and in order.
    #[test]
    fn messages_cut_anywhere_come_back_whole() {
        let messages: Vec<Vec<u8>> = [0usize, 1, 3, 4, 5, 300, 70]
            .iter()
            .enumerate()
            .map(|(i, n)| (0..*n).map(|k| (k * 7 + i) as u8).collect())
            .collect();
        let stream: Vec<u8> = messages.iter().flat_map(|m| frame(m).to_vec()).collect();
        for cut in 1..=stream.len() {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                r.push(Bytes::copy_from_slice(piece), &mut |m| got.push(m.to_vec()))
                    .expect("push");
            }
            assert_eq!(got, messages, "pieces of {cut}");
        }
    }

    #[test]
    fn an_oversized_announcement_is_refused() {
        let mut r = FrameReader::default();
        let bad = prefix(MAX_FRAME + 1);
        assert_eq!(
            r.push(Bytes::copy_from_slice(&bad[..2]), &mut |_| {}),
            Ok(0)
        );
        assert_eq!(
            r.push(Bytes::copy_from_slice(&bad[2..]), &mut |_| {}),
            Err(TooLarge)
        );
    }
}
