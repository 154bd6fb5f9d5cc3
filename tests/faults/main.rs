//! Fault injection on the dial path (issue #13): a frozen agent, a black-holed path and a
//! frozen peer proxy, each with a dial load running through a proxy's client entry. No dial
//! may wait longer than the time to declare the path dead plus one retry, and the dials are
//! served by the other paths; streams carried by a dead path end for their clients.
//!
//! Each test prints its dial latencies (p50, p99, max) during the fault: measured, not
//! asserted (run with `--nocapture` to read them).

#[path = "../support/mod.rs"]
mod support;

mod agents;
mod load;
mod peers;
