"""Hand-written ops. Each module has `forward(...) -> (out, cache)` and
`backward(dout, cache) -> dict of gradients`, written against the array module of its inputs
(NumPy or CuPy), with the math in its docstring and the shapes in comments."""
