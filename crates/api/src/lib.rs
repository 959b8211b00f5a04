//! Netbore's control API as types, shared by control (the server), the agent and
//! scripts (the clients), without linking any server.
//!
//! - [`types`]: the REST API's JSON requests and responses (the contract, field by
//!   field, is `docs/control.md`);
//! - [`code`]: [`ErrorCode`], every error code control sends;
//! - [`client`]: a small REST client ([`ControlClient`]);
//! - [`event`]: [`ControlEvent`], what replicas tell each other and their edges.
//!
//! The gRPC API's types are generated from `proto/` in `netbore-proto`.

pub mod client;
pub mod code;
pub mod event;
pub mod types;

pub use client::{ControlClient, ControlError};
pub use code::ErrorCode;
pub use event::ControlEvent;
