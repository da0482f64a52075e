//! The built-in echo agent: replies with what the user wrote, several messages of one turn
//! joined by newlines. For trying the pipeline without any model.

use super::TurnInput;

pub fn reply(input: &TurnInput<'_>) -> String {
    input
        .messages
        .iter()
        .map(|m| m.body.as_str())
        .filter(|b| !b.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}
