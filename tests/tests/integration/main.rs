//! Integration tests: each scenario builds its own node namespace, loads the real datapath into
//! the real kernel, sends real packets and asserts on what arrives and what was counted.
//! Tests that cannot run here print `SKIP <test>: <reason>` and return.

mod agent;
mod cluster;
mod cni;
mod correctness;
mod counters;
mod doctor;
mod edges;
mod init;
mod ipvsadm;
mod node;
mod packets;
mod sandboxes;
mod services;
mod state;
mod upgrade;
