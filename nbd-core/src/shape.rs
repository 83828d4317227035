//! The shape both state machines share: what `process` returns, what
//! `poll_transmit` hands out, the table of requests in flight and the ids
//! it hands out, and the TLS policy. [`server`](crate::server) and [`client`](crate::client)
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

/// A message as a side describes it before lending it out as a
/// [`Transmit`]: `head` bytes encoded at the front of the side's scratch,
/// two tails whose origin `T` each side names (its buffer, its catalog),
/// then the shell's payload `P`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out<T, P> {
    pub(crate) head: usize,
    pub(crate) tails: [T; 2],
    pub(crate) payload: Option<P>,
}

impl<T: Copy + Default, P> Out<T, P> {
    /// Encodes a header and fixed fields into `scratch`, which each side
    /// sizes for every one it sends, so `encode` cannot run short. The
    /// tails start empty (`T::default()`).
    pub(crate) fn encode_head(
        scratch: &mut [u8],
        encode: impl FnOnce(&mut [u8]) -> Result<usize, crate::wire::WireError>,
    ) -> Self {
        let head = encode(scratch);
        debug_assert!(head.is_ok(), "scratch too small: {head:?}");
        Self {
            head: head.unwrap_or(0),
            tails: [T::default(); 2],
            payload: None,
        }
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

/// The bounded table of requests in flight both sides keep: `N` slots,
/// each free or holding one request's `T`. The table hands out the ids:
/// a request's [`RequestId`] is its slot's dense [`index`](RequestId::index)
/// and the slot's generation, bumped at each reuse, so an id of a request
/// already answered never reaches the one that took its slot over.
#[derive(Debug)]
pub struct SlotTable<T, const N: usize> {
    slots: [Option<T>; N],
    /// Each slot's generation, apart from the slots so that it does not
    /// round every slot up to its alignment.
    generations: [u16; N],
    used: usize,
}

impl<T: Copy, const N: usize> SlotTable<T, N> {
    /// An empty table.
    pub const fn new() -> Self {
        assert!(
            N > 0 && N <= u16::MAX as usize,
            "REQUESTS must be between 1 and 65535"
        );
        Self {
            slots: [None; N],
            generations: [0; N],
            used: 0,
        }
    }
}

impl<T: Copy, const N: usize> Default for SlotTable<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> SlotTable<T, N> {
    /// Requests held.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether no request is held.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Whether every slot is taken.
    pub fn is_full(&self) -> bool {
        self.used >= N
    }

    /// Stores `value` in the first free slot, under a new id; `None` when
    /// the table is full.
    pub fn insert(&mut self, value: T) -> Option<RequestId> {
        let index = self.slots.iter().position(Option::is_none)?;
        let generation = self.generations[index].wrapping_add(1);
        self.generations[index] = generation;
        self.slots[index] = Some(value);
        self.used += 1;
        Some(RequestId::new(index, generation))
    }

    /// The slot `id` names, if its generation is `id`'s.
    fn index_of(&self, id: RequestId) -> Option<usize> {
        let index = id.index();
        (self.generations.get(index) == Some(&id.generation())).then_some(index)
    }

    /// The request `id` names, if it is still held.
    pub fn get(&self, id: RequestId) -> Option<&T> {
        self.slots[self.index_of(id)?].as_ref()
    }

    /// The request `id` names, mutably.
    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut T> {
        let index = self.index_of(id)?;
        self.slots[index].as_mut()
    }

    /// The request held at a dense index (as kept in a queue), with its id.
    pub fn at_mut(&mut self, index: usize) -> Option<(RequestId, &mut T)> {
        let id = RequestId::new(index, *self.generations.get(index)?);
        self.slots[index].as_mut().map(|value| (id, value))
    }

    /// Frees the slot of `id`; returns what it held.
    pub fn remove(&mut self, id: RequestId) -> Option<T> {
        let index = self.index_of(id)?;
        let value = self.slots[index].take()?;
        self.used -= 1;
        Some(value)
    }

    /// The requests held, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (RequestId, &T)> {
        self.slots
            .iter()
            .zip(self.generations.iter().copied())
            .enumerate()
            .filter_map(|(index, (slot, generation))| {
                let id = RequestId::new(index, generation);
                slot.as_ref().map(|value| (id, value))
            })
    }
}

/// Makes room in a shell's fixed input buffer once the core took what it
/// could from `buffer[start..end]`: an emptied window rewinds to the
/// front, a window that reaches the end of the buffer moves its unread
/// bytes to the front, any other stays where it is (moving on every pass
/// would copy pipelined input over and over). Returns the new
/// `(start, end)`; `end == buffer.len()` afterwards means the buffer is
/// full of input the core did not take. The server and client shells of
/// every crate (std, embedded) compact their input with this.
pub fn make_room(buffer: &mut [u8], start: usize, end: usize) -> (usize, usize) {
    if start == end {
        (0, 0)
    } else if end == buffer.len() {
        buffer.copy_within(start..end, 0);
        (0, end - start)
    } else {
        (start, end)
    }
}

/// Bytes either side keeps of a header or fixed field split across
/// inputs: the longest is a 32-byte extended request or reply header.
pub(crate) const ACCUMULATOR_BYTES: usize = 32;

/// Collects a fixed-size header or field that may arrive split across
/// `process` calls, for both sides. Two ways to use it:
///
/// - [`take_field`](Self::take_field) for a field parsed as soon as it is
///   whole: no copy when it arrives in one piece, and forgotten once
///   returned (the server's option and request headers).
/// - [`fill`](Self::fill) for a field parsed in steps (a magic number, then
///   the header it announces): the bytes stay until [`clear`](Self::clear)
///   (the client's replies).
#[derive(Debug)]
pub(crate) struct Accumulator {
    bytes: [u8; ACCUMULATOR_BYTES],
    len: usize,
}

impl Accumulator {
    pub(crate) const fn new() -> Self {
        Self {
            bytes: [0; ACCUMULATOR_BYTES],
            len: 0,
        }
    }

    /// Takes bytes from `input` towards a `need`-byte field. Returns the
    /// bytes consumed and, once the field is whole, its bytes: borrowed
    /// from `input` when none were held before, else from the accumulator,
    /// which is then empty again.
    pub(crate) fn take_field<'s>(
        &'s mut self,
        input: &'s [u8],
        need: usize,
    ) -> (usize, Option<&'s [u8]>) {
        let need = need.min(ACCUMULATOR_BYTES);
        if self.len == 0 && input.len() >= need {
            return (need, Some(&input[..need]));
        }
        let (take, whole) = self.fill(input, need);
        if whole {
            self.len = 0;
            (take, Some(&self.bytes[..need]))
        } else {
            (take, None)
        }
    }

    /// Takes bytes from `input` until `need` bytes are held (capped at the
    /// accumulator's size). Returns the bytes consumed and whether they are.
    pub(crate) fn fill(&mut self, input: &[u8], need: usize) -> (usize, bool) {
        let need = need.min(ACCUMULATOR_BYTES);
        let take = need.saturating_sub(self.len).min(input.len());
        self.bytes[self.len..self.len + take].copy_from_slice(&input[..take]);
        self.len += take;
        (take, self.len == need)
    }

    /// The bytes held.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// How many bytes are held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is held: no field is cut short.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` bytes last collected, still readable after `clear`
    /// until the next `fill`.
    pub(crate) fn held(&self, len: usize) -> &[u8] {
        &self.bytes[..len.min(ACCUMULATOR_BYTES)]
    }

    /// Forgets the bytes held.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod accumulator_tests {
    use super::{Accumulator, make_room};

    #[test]
    fn make_room_moves_input_only_when_it_must() {
        let mut buffer = *b"abcdefgh";
        // Emptied: rewound.
        assert_eq!(make_room(&mut buffer, 5, 5), (0, 0));
        // Room left at the end: nothing moves.
        assert_eq!(make_room(&mut buffer, 2, 6), (2, 6));
        assert_eq!(&buffer, b"abcdefgh");
        // Reaching the end: the unread bytes go to the front.
        assert_eq!(make_room(&mut buffer, 5, 8), (0, 3));
        assert_eq!(&buffer[..3], b"fgh");
        // Full of untaken input: still full, for the shell to report.
        assert_eq!(make_room(&mut buffer, 0, 8), (0, 8));
    }

    #[test]
    fn a_whole_field_is_borrowed_and_a_split_one_is_joined() {
        let mut accumulator = Accumulator::new();
        let (used, field) = accumulator.take_field(&[1, 2, 3, 4, 5], 4);
        assert_eq!((used, field), (4, Some(&[1, 2, 3, 4][..])));
        assert!(accumulator.is_empty(), "a whole field was copied");
        assert_eq!(accumulator.take_field(&[1, 2], 4), (2, None));
        assert_eq!(accumulator.len(), 2);
        let (used, field) = accumulator.take_field(&[3, 4, 5], 4);
        assert_eq!((used, field), (2, Some(&[1, 2, 3, 4][..])));
        assert!(accumulator.is_empty());
    }

    #[test]
    fn filled_bytes_stay_until_cleared() {
        let mut accumulator = Accumulator::new();
        assert_eq!(accumulator.fill(&[1, 2], 3), (2, false));
        assert_eq!(accumulator.fill(&[3, 4], 3), (1, true));
        assert_eq!(accumulator.bytes(), [1, 2, 3]);
        assert_eq!(accumulator.fill(&[9], 2), (0, false), "past `need`");
        accumulator.clear();
        assert_eq!(accumulator.held(3), [1, 2, 3]);
        assert_eq!(accumulator.fill(&[7; 40], 40), (32, true), "capped");
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

#[cfg(test)]
mod slot_table_tests {
    use super::{RequestId, SlotTable};

    #[test]
    fn ids_are_dense_and_stale_ids_are_refused() {
        let mut table = SlotTable::<u8, 2>::new();
        let a = table.insert(1).expect("free slot");
        let b = table.insert(2).expect("free slot");
        assert_eq!((a.index(), b.index()), (0, 1));
        assert!(table.is_full());
        assert_eq!(table.insert(3), None);
        assert_eq!(table.remove(a), Some(1));
        assert_eq!(table.remove(a), None, "freed twice");
        let c = table.insert(4).expect("freed slot");
        assert_eq!(c.index(), a.index());
        assert_ne!(c, a, "a reused slot must get a new generation");
        assert_eq!(table.get(a), None, "a stale id reached the new request");
        assert_eq!(table.get(c), Some(&4));
        *table.get_mut(b).expect("held") = 5;
        assert_eq!(table.at_mut(1).map(|(id, v)| (id, *v)), Some((b, 5)));
        assert_eq!(
            table
                .iter()
                .map(|(id, v)| (id, *v))
                .collect::<heapless::Vec<_, 2>>(),
            [(c, 4), (b, 5)]
        );
        assert_eq!(table.get(RequestId::from_bits(u32::MAX)), None);
        assert_eq!(table.len(), 2);
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
