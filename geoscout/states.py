"""The 50 US states in alphabetical order: the competition's `state_idx` is a position here."""

from __future__ import annotations

STATES: tuple[str, ...] = (
    "Alabama", "Alaska", "Arizona", "Arkansas", "California",
    "Colorado", "Connecticut", "Delaware", "Florida", "Georgia",
    "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa",
    "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland",
    "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri",
    "Montana", "Nebraska", "Nevada", "New Hampshire", "New Jersey",
    "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina",
    "South Dakota", "Tennessee", "Texas", "Utah", "Vermont",
    "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming",
)
NUM_STATES = len(STATES)
_INDEX = {name: i for i, name in enumerate(STATES)}


def state_name(state_idx: int) -> str:
    if not 0 <= state_idx < NUM_STATES:
        raise ValueError(f"state_idx {state_idx} is outside 0..{NUM_STATES - 1}")
    return STATES[state_idx]


def state_index(name: str) -> int:
    try:
        return _INDEX[name]
    except KeyError:
        raise ValueError(f"unknown state name {name!r}; expected one of the 50 US states") from None
