//! Examples of linking the NBD core.
