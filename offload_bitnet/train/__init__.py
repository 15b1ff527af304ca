"""The fine-tuning product behind finetune.py: run configuration, data, the trainer loop, schedules, metrics, the dry-run plan and its calibration."""
