"""epd: EPD-Solver sampling, Stage-1 distillation, Stage-2 RDPO, evaluation and reports."""

__version__ = "0.1.0"
