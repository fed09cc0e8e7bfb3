"""peft-m2ist: M2IST side-tuning for referring expression comprehension, as a PEFT plugin."""

__version__ = "0.1.0"
