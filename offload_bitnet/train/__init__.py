"""The fine-tuning product behind finetune.py: the run configuration (``runconfig``, read by ``runconfig_loading``),
data (``records`` -> ``data``), what a run prepares (``setup``) in its folder (``run_folder``), the trainer loop
(``trainer``) with its reporting, stopping, samples, schedules and metrics, and the dry-run plan with its calibration."""
