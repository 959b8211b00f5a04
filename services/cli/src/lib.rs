//! The `netbore` command's library part: [`dev`], control, an edge and an agent in one
//! process (`netbore dev`, and the test kit); [`config`], the config file, and
//! [`start`], which runs its tunnels. The agent itself is `netbore-agent`, which links
//! no server.

pub mod config;
pub mod console;
pub mod dev;
pub mod start;
