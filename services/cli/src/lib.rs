//! The `netbore` command's library part: [`dev`], control, an edge and an agent in one
//! process (`netbore dev`, and the test kit). The agent itself is `netbore-agent`,
//! which links no server.

pub mod console;
pub mod dev;
