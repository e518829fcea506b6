"""The AFT stages: training (VFT and alignment), sampling candidate groups, evaluation, the memory plan."""
