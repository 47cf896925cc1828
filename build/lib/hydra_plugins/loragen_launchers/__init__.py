"""loragen's Hydra launchers (found by Hydra's plugin discovery in the `hydra_plugins` namespace package).

- `SlurmLauncher` / `LocalLauncher`: hydra-submitit-launcher's, plus a sweep summary (one line per job,
  with its log path) and a job that exits non-zero reported as a failure instead of hanging the sweep.
- `NodePoolLauncher`: a sweep's jobs in parallel on one machine, each pinned to its own GPU(s).
Presets: conf/hydra/launcher/{slurm_a800,slurm_local,node_pool}.yaml.
"""
