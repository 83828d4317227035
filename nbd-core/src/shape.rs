//! The shape both state machines share: what `process` returns, what
//! `poll_transmit` hands out, the id of a request in flight and the TLS
//! policy. [`server`](crate::server) and [`client`](crate::client)
//! re-export them under the same names, so a shell written against one
//! side reads the same on the other.

/// The result of one `process` call: how much input was consumed and at
/// most one event. Dropping it loses `consumed`, which the shell must
/// drop from its input before the next call.
#[derive(Debug)]
#[must_use = "the shell must drop `consumed` bytes of its input and act on `event`"]
pub struct Step<E> {
    /// Bytes of the input consumed; the shell drops them.
    pub consumed: usize,
    /// What the shell must act on, if anything.
    pub event: Option<E>,
}

/// One message to send: `parts` in order (empty ones skipped), then the
/// shell-owned `payload`, if any. The core counts it as sent once
/// returned, so dropping it unsent breaks the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the core counts the message as sent: the shell must send it"]
pub struct Transmit<'a, P> {
    /// Header bytes the core encoded, then strings borrowed from the
    /// catalog (server) or copied from the configuration (client).
    pub parts: [&'a [u8]; 3],
    /// What the shell appends after the parts.
    pub payload: Option<P>,
}

impl<P> Transmit<'_, P> {
    /// Total bytes of `parts`.
    pub fn parts_len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
}

/// Identifies a request in flight on one connection. Ids are reused once a
/// request is answered; a stale id is refused, not misapplied. On the
/// client it is also the request's cookie on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestId(u32);

impl RequestId {
    pub(crate) fn new(index: usize, generation: u16) -> Self {
        // Tables hold at most u16::MAX slots (checked where they are built).
        Self((u32::from(generation) << 16) | (index as u32 & 0xffff))
    }

    /// The request's slot: dense, below the connection's `REQUESTS`
    /// parameter, and unique among the requests in flight, so a shell can
    /// keep per-request data in an array of `REQUESTS` entries instead of
    /// a map. A slot is reused once its request is answered.
    pub fn index(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    pub(crate) fn generation(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The cookie a client request carries on the wire: its id. (A
    /// server's replies carry the cookies its client chose, not this.)
    pub fn cookie(self) -> u64 {
        u64::from(self.0)
    }

    /// The id as a number, for shells that must pass it through a foreign
    /// interface (JavaScript, a queue).
    pub fn to_bits(self) -> u32 {
        self.0
    }

    /// An id from [`to_bits`](Self::to_bits).
    pub fn from_bits(bits: u32) -> Self {
        Self(bits)
    }
}

/// How a side handles TLS (spec: "TLS support").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TlsPolicy {
    /// No TLS. A server answers `NBD_OPT_STARTTLS` with
    /// `NBD_REP_ERR_POLICY` (NOTLS mode); a client never sends it.
    #[default]
    Disabled,
    /// TLS when the peer agrees. A server accepts `NBD_OPT_STARTTLS` on the
    /// client's request (SELECTIVETLS with no TLS-only export); a client
    /// sends it first and goes on in clear if the server refuses.
    Optional,
    /// TLS before anything else. A server answers other options with
    /// `NBD_REP_ERR_TLS_REQD` (FORCEDTLS mode); a client sends
    /// `NBD_OPT_STARTTLS` first and ends the session if the server refuses.
    Required,
}

/// A shell's data per request in flight, kept at each id's dense
/// [`index`](RequestId::index): constant-time access with no hashing, and
/// no larger than the connection's request table (it grows to the highest
/// index used). An entry answers only to the id it was stored under, so
/// data of an answered request never reaches the request that reuses its
/// slot.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct RequestMap<T> {
    slots: alloc::vec::Vec<Option<(RequestId, T)>>,
    len: usize,
}

#[cfg(feature = "alloc")]
impl<T> Default for RequestMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "alloc")]
impl<T> RequestMap<T> {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            slots: alloc::vec::Vec::new(),
            len: 0,
        }
    }

    /// Stores `value` for `id`; returns what its slot held before (for
    /// `id`, or for an earlier request of the same slot).
    pub fn insert(&mut self, id: RequestId, value: T) -> Option<T> {
        let index = id.index();
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || None);
        }
        let old = self.slots[index].replace((id, value)).map(|(_, v)| v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value stored for `id`.
    pub fn get(&self, id: RequestId) -> Option<&T> {
        match self.slots.get(id.index()) {
            Some(Some((stored, value))) if *stored == id => Some(value),
            _ => None,
        }
    }

    /// The value stored for `id`, mutably.
    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut T> {
        match self.slots.get_mut(id.index()) {
            Some(Some((stored, value))) if *stored == id => Some(value),
            _ => None,
        }
    }

    /// Whether a value is stored for `id`.
    pub fn contains(&self, id: RequestId) -> bool {
        self.get(id).is_some()
    }

    /// Takes the value stored for `id`.
    pub fn remove(&mut self, id: RequestId) -> Option<T> {
        let slot = self.slots.get_mut(id.index())?;
        if !matches!(slot, Some((stored, _)) if *stored == id) {
            return None;
        }
        self.len -= 1;
        slot.take().map(|(_, value)| value)
    }

    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every value.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }

    /// The stored ids and values, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (RequestId, &T)> {
        self.slots
            .iter()
            .filter_map(|slot| slot.as_ref().map(|(id, value)| (*id, value)))
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::{RequestId, RequestMap};

    #[test]
    fn request_map_answers_only_the_stored_id() {
        let mut map = RequestMap::new();
        let first = RequestId::new(3, 0);
        let reuse = RequestId::new(3, 1);
        assert_eq!(map.insert(first, "a"), None);
        assert_eq!(map.insert(RequestId::new(0, 0), "b"), None);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(first), Some(&"a"));
        assert_eq!(map.get(reuse), None, "a stale generation reached new data");
        assert_eq!(map.remove(reuse), None);
        assert_eq!(map.len(), 2);
        assert_eq!(map.insert(reuse, "c"), Some("a"));
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(first), None);
        *map.get_mut(reuse).expect("reused slot") = "d";
        assert_eq!(
            map.iter().collect::<alloc::vec::Vec<_>>(),
            [(RequestId::new(0, 0), &"b"), (reuse, &"d")]
        );
        assert_eq!(map.remove(reuse), Some("d"));
        assert!(!map.contains(reuse));
        assert_eq!(map.len(), 1);
        map.clear();
        assert!(map.is_empty());
    }
}
