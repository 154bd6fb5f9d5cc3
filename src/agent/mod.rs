//! The leaf side: agents that dial out to the root's proxies and serve dials through them.

pub mod allow_list;
pub mod connect;
