//! lb-agent's test tools, kept out of the product so the shipped binary and image hold only
//! the proxy.
//!
//! - [`asyncpod`]: a fake asynchronous pod (submit → `202` + `Location`, status, callbacks);
//! - [`fakeapi`]: a fake Kubernetes API server serving EndpointSlices to the real kube-rs
//!   client (lists, watches, bookmarks, 410 Expired, 403 Forbidden, outages);
//! - [`fakepod`]: fake compute pods that take their time and count their own load (what the
//!   tests and bench/ read as the truth about how many requests a pod held);
//! - [`scriptpod`]: a raw-socket pod that hangs, trickles, or answers and then keeps its
//!   connection open whatever the client does (what hyper will not do);
//! - [`loadgen`]: a one-request-per-connection HTTP client;
//! - [`demo`]: the demo of the quick start.
//!
//! The binary (`src/main.rs`) serves `testkit demo` and `testkit fakepods …` (bench/).

pub mod asyncpod;
pub mod demo;
pub mod fakeapi;
pub mod fakepod;
pub mod loadgen;
pub mod scriptpod;
