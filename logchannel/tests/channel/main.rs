//! The TCP log channel's tests: real sockets on 127.0.0.1, every test under
//! a time limit. Tests that pick something at random print their seed;
//! `FTVM_SEED=<seed>` repeats it.

mod corruption;
mod failure;
mod flow;
mod goodbye;
mod handshake;
mod progress;
mod slow_link;
mod stream;
mod support;
mod wire;
