//! std shell for the NBD core.
