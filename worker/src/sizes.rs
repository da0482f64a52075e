//! What a turn in flight holds. The dispatcher keeps each turn's future on the heap for the
//! whole turn, the agent's seconds included, so a worker holding 10,000 slow turns holds
//! 10,000 of them: every step a turn awaits besides the agent call is boxed (turn.rs), and the
//! agent call is pinned by the turn itself rather than handed by value to the keep-alive
//! around it.

use crate::turn::{Item, TurnContext, handle};

/// The size of the future `f` returns.
fn future_size<'a, F>(_: impl FnOnce(&'a TurnContext, Vec<Item>) -> F) -> usize {
    std::mem::size_of::<F>()
}

#[test]
fn a_turn_in_flight_holds_little_besides_its_agent_call() {
    let size = future_size(handle);
    eprintln!("turn: {size} bytes");
    assert!(size < 2 * 1024, "a turn's future: {size} bytes");
}
