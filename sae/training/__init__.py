"""Stage 6, training: the step, the loop, checkpoints, the run folder and a whole run.

- ``trainer``: the training step and loop, sweeps, resumable trainer state.
- ``checkpoint``: the ``state/`` folder, written atomically, read back with checks.
- ``run_folder``: a run folder's layout, claim (lock), resume checks, clean-up; no torch.
- ``run``: one run end to end (what ``train.py`` calls).

May import stages 1-5, ``sae.formats`` and the sides.
"""
