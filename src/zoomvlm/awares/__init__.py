"""AwaRes: a low-resolution view first, then the high-resolution crops of a fixed crop set on request.

- :mod:`~zoomvlm.awares.protocol`: the crop set, the ONE ``GET_CROPS`` grammar and parser, the policies' actions,
  views and trajectories;
- :mod:`~zoomvlm.awares.policies`: the external crop-set policies (learned, fixed, oracle);
- :mod:`~zoomvlm.awares.self_zoom`: the target VLM decides itself (turn 1 -> tool call -> turn 2, KV reuse);
- :mod:`~zoomvlm.awares.rewards`: ``R = R_ans - C_tool`` for both variants (``awares`` in recipes);
  :mod:`~zoomvlm.awares.curation`: LR/HR labels;
- :mod:`~zoomvlm.awares.weighted_sft` and :mod:`~zoomvlm.awares.grpo`: cold-start SFT and multi-turn GRPO.
"""
