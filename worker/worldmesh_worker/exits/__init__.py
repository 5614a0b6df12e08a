"""Early exits (Apparate): ramps, their training, online threshold tuning, ramp management.

- ``ramps``: the ramp heads, candidate sites and the ramps file;
- ``train``: ``worldmesh ramps train`` (distillation from the full model, backbone frozen);
- ``tuner``: the greedy hill climb on per-ramp thresholds under the accuracy budget;
- ``manager``: switching ramps on and off by utility under the ramp-overhead budget;
- ``controller``: the front stage's state (release, labelling, tuning, metrics, status);
- ``stage``: early exits inside a stage worker (ramps run in its compute, their answers
  sent upstream or decided at the front, the active set passed downstream).
"""
