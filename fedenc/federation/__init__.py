"""The federation core: parameter sets, fusion rules (the patent's "first preset rule" and its
rivals) and stop rules (the "second preset rule")."""
