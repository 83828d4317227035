//! A small map from request ids to values: at most a request table's worth
//! of entries, so a vector with linear search is enough (and much smaller
//! in the `.wasm` than a `BTreeMap`).

/// Values by request id.
#[derive(Debug)]
pub(crate) struct IdMap<T>(Vec<(u32, T)>);

impl<T> IdMap<T> {
    pub(crate) const fn new() -> Self {
        Self(Vec::new())
    }

    /// Sets the value of `id`, replacing any earlier one.
    pub(crate) fn insert(&mut self, id: u32, value: T) {
        self.remove(id);
        self.0.push((id, value));
    }

    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    pub(crate) fn remove(&mut self, id: u32) -> Option<T> {
        let index = self.0.iter().position(|(i, _)| *i == id)?;
        Some(self.0.swap_remove(index).1)
    }
}

#[cfg(test)]
mod tests {
    use super::IdMap;

    #[test]
    fn insert_get_remove() {
        let mut map = IdMap::new();
        map.insert(1, "a");
        map.insert(2, "b");
        map.insert(1, "c");
        assert_eq!(map.get(1), Some(&"c"));
        assert_eq!(map.remove(2), Some("b"));
        assert_eq!(map.remove(2), None);
        assert_eq!(map.get(1), Some(&"c"));
    }
}
