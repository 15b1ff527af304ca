"""The streaming step: forward block by block, replayed backward, updates written behind, prefetch.

``streaming.py`` runs the step's compute from a ``step_plan.StepPlan`` (every load named by unit and kind, taken
by name); ``context.py`` holds the step's own values; ``trainables.py`` says what a step trains (``FullWeights``
or ``LoRA``, one interface) and where it commits; ``updates.py`` is a unit's AdamW update; ``streams.py`` the
prefetcher, the writer and the activation stash; ``stats.py`` what a step reports.
"""
