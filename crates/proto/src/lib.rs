//! Generated gRPC code for Netbore's services. Never edited by hand: change `proto/`.
#![allow(missing_docs, clippy::all)]

/// `netbore.control.v1`: the operators' API.
pub mod control {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("netbore.control.v1");
    }
}

/// `netbore.edge.v1`: the edge ⇄ control link.
pub mod edge {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("netbore.edge.v1");
    }
}

/// The encoded descriptor set of every Netbore service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/netbore_descriptor.bin"));
