"""The spec DSL, public: protocols, typed state, actions, properties (`from kvproof.spec import ...`)."""
from kvproof.spec.core import (NAT_PROPERTY, Bool, Channel, EnumT, Nat, OwnershipError, Protocol,
                               ProtocolViolation, SpecError, Var, action, invariant, liveness)
from kvproof.spec.instance import Instance

__all__ = ["Bool", "Channel", "EnumT", "Instance", "NAT_PROPERTY", "Nat", "OwnershipError", "Protocol",
           "ProtocolViolation", "SpecError", "Var", "action", "invariant", "liveness"]
