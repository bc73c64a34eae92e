"""Evaluation of adapters: held-out loss per category (heldout.py), generated answers and ROUGE-L
(evaluate.py), question sets (questions.py), the LLM judge (judge.py), reports (report.py),
`fedit eval` (pipeline.py) and the CLI wiring of `fedit eval` / `fedit reproduce` (cli.py)."""
