"""The shipped policies, one module each; see `smartscope.control.policy` for the contract."""
