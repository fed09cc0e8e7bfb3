"""The pieces of `benchmarks/report.py`: `base` (labels, number formats, what a run's settings say, the templates),
`memory` (the memory and time sections, where the peaks are), `goals` (the paper's goals and the summary),
`accuracy` (accuracy at equal budget) and `figure` (the accuracy-vs-memory plot)."""
