"""One recorder for the loop, many writers behind it: the timing file first (the record of
truth), then views of it such as TensorBoard."""

from __future__ import annotations


class Fanout:
    def __init__(self, *writers):
        self.writers = [w for w in writers if w is not None]

    def add_round(self, *args, **kwargs) -> None:
        for w in self.writers:
            w.add_round(*args, **kwargs)

    def add_eval(self, *args) -> None:
        for w in self.writers:
            w.add_eval(*args)

    def add_noise(self, *args) -> None:
        for w in self.writers:
            if hasattr(w, "add_noise"):  # the timing file only: TensorBoard has no noise-scale view
                w.add_noise(*args)

    def finish(self, *args) -> None:
        for w in self.writers:
            w.finish(*args)
