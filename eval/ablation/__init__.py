"""The grid vs manager ablation as one resumable command (`python -m eval ablation`).

`plan` (variants and their recipe chains, as data), `schedule` (how long, on what: YAML in `schedules/`), `steps`
(each unit of work and how it knows it is done), `launchers` (in-process or subprocesses), `scheduler` (the steps in
order, stage runs side by side on a CPU), `progress` (step lines), `main` (the command line).
"""
