"""A denoiser wrapper that records the batch rows of every call (what the network saw), shared by the solver tests."""


class CallRecorder:
    def __init__(self, inner):
        self.inner, self.coords, self.passes_per_eval = inner, inner.coords, inner.passes_per_eval
        self.rows: list[int] = []

    def __call__(self, x, sigma, cond=None):
        self.rows.append(x.shape[0])
        return self.inner(x, sigma, cond)
