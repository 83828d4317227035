//! Bit-flag fields of the protocol (spec: "Values" → "Flag fields").
//!
//! Each field is a newtype over its wire integer so unknown bits survive a
//! parse → encode round trip; `unknown_bits()` tells a peer's extras apart.

macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        $name:ident: $repr:ty {
            $( $(#[$flag_meta:meta])* $flag:ident = $bit:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$flag_meta])* pub const $flag: Self = Self(1 << $bit); )*

            /// Every flag this version of the spec defines for the field.
            pub const KNOWN: Self = Self(0 $(| (1 << $bit))*);

            /// No flag set.
            pub const fn empty() -> Self {
                Self(0)
            }

            /// The raw wire value.
            pub const fn bits(self) -> $repr {
                self.0
            }

            /// Whether every flag of `other` is set in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether any flag of `other` is set in `self`.
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            /// Bits set that the spec does not define for this field.
            pub const fn unknown_bits(self) -> $repr {
                self.0 & !Self::KNOWN.0
            }

            /// `self` with the flags of `other` added.
            #[must_use]
            pub const fn with(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// `self` with the flags of `other` removed.
            #[must_use]
            pub const fn without(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }

            /// `self` with `other` added when `on`, removed otherwise.
            #[must_use]
            pub const fn with_if(self, other: Self, on: bool) -> Self {
                if on { self.with(other) } else { self.without(other) }
            }

            const NAMES: &'static [(&'static str, $repr)] = &[$((stringify!($flag), 1 << $bit)),*];
        }

        impl core::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.with(rhs)
            }
        }

        impl core::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                *self = self.with(rhs);
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                let mut first = true;
                for (name, bit) in Self::NAMES {
                    if self.0 & bit != 0 {
                        if !first {
                            f.write_str(" | ")?;
                        }
                        f.write_str(name)?;
                        first = false;
                    }
                }
                if self.unknown_bits() != 0 {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{:#x}", self.unknown_bits())?;
                }
                f.write_str(")")
            }
        }

        #[cfg(feature = "defmt")]
        impl defmt::Format for $name {
            fn format(&self, f: defmt::Formatter<'_>) {
                defmt::write!(f, "{}({=?})", stringify!($name), self.0)
            }
        }
    };
}

flag_set! {
    /// Handshake flags, sent by the server after `IHAVEOPT` (16 bits).
    HandshakeFlags: u16 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`
        FIXED_NEWSTYLE = 0;
        /// `NBD_FLAG_NO_ZEROES`
        NO_ZEROES = 1;
    }
}

flag_set! {
    /// Client flags, the client's answer to the handshake flags (32 bits).
    ClientFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`
        FIXED_NEWSTYLE = 0;
        /// `NBD_FLAG_C_NO_ZEROES`
        NO_ZEROES = 1;
    }
}

flag_set! {
    /// Transmission flags, sent with the export's size (16 bits).
    TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`: always set.
        HAS_FLAGS = 0;
        /// `NBD_FLAG_READ_ONLY`
        READ_ONLY = 1;
        /// `NBD_FLAG_SEND_FLUSH`
        SEND_FLUSH = 2;
        /// `NBD_FLAG_SEND_FUA`
        SEND_FUA = 3;
        /// `NBD_FLAG_ROTATIONAL`
        ROTATIONAL = 4;
        /// `NBD_FLAG_SEND_TRIM`
        SEND_TRIM = 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`
        SEND_WRITE_ZEROES = 6;
        /// `NBD_FLAG_SEND_DF`
        SEND_DF = 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`
        CAN_MULTI_CONN = 8;
        /// `NBD_FLAG_SEND_RESIZE`
        SEND_RESIZE = 9;
        /// `NBD_FLAG_SEND_CACHE`
        SEND_CACHE = 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`
        SEND_FAST_ZERO = 11;
        /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`
        BLOCK_STATUS_PAYLOAD = 12;
    }
}

flag_set! {
    /// Command flags of a request (16 bits).
    CommandFlags: u16 {
        /// `NBD_CMD_FLAG_FUA`
        FUA = 0;
        /// `NBD_CMD_FLAG_NO_HOLE`
        NO_HOLE = 1;
        /// `NBD_CMD_FLAG_DF`
        DF = 2;
        /// `NBD_CMD_FLAG_REQ_ONE`
        REQ_ONE = 3;
        /// `NBD_CMD_FLAG_FAST_ZERO`
        FAST_ZERO = 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers only)
        PAYLOAD_LEN = 5;
    }
}

flag_set! {
    /// Flags of a structured or extended reply chunk (16 bits).
    ReplyFlags: u16 {
        /// `NBD_REPLY_FLAG_DONE`: last chunk of the reply.
        DONE = 0;
    }
}

flag_set! {
    /// Status flags of the `base:allocation` metadata context.
    AllocationFlags: u32 {
        /// `NBD_STATE_HOLE`: not allocated.
        HOLE = 0;
        /// `NBD_STATE_ZERO`: reads as zeroes.
        ZERO = 1;
    }
}
