"""Public ops, one module per family: validation, backend dispatch and autograd wiring."""
