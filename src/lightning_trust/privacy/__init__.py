"""lightning_trust.privacy: DP-SGD for any LightningModule (Opacus).

How Opacus is attached to an unchanged LightningModule:

* ``setup``: the module is validated with Opacus's ``ModuleValidator`` (BatchNorm and other
  DP-incompatible layers are refused, or replaced with ``fix_module=True``) before
  ``configure_optimizers`` builds the optimizer from its parameters.
* ``on_fit_start``: Opacus's ``GradSampleHooks`` (the hook half of ``GradSampleModule``, no wrapper)
  are attached to the module (:mod:`~lightning_trust.privacy.hooks`), so the user's ``self(x)``
  inside ``training_step`` records per-sample gradients. The fit loop's train loader is replaced
  through the seam by its Poisson-sampled equivalent (:mod:`~lightning_trust.privacy.loader`:
  Opacus's ``DPDataLoader``, distributed-aware under DDP), keeping the dataset, ``collate_fn`` and
  workers.
* When that loader is built, the sample rate and planned steps are known: the noise multiplier is
  planned (:meth:`DifferentialPrivacy.noise_plan`, by default Opacus's ``get_noise_multiplier`` for
  a target ε, see :mod:`~lightning_trust.privacy.accounting`), and the optimizer the Trainer got
  from ``configure_optimizers`` is wrapped in Opacus's ``DPOptimizer`` (``DistributedDPOptimizer``
  under DDP, per-layer and fast-gradient-clipping variants as configured, clipping bounds from
  :meth:`DifferentialPrivacy.clip_plan`) whose step hook feeds the accountant.
* When another callback replaces the module's parameters (structural pruning swaps each pruned
  ``nn.Parameter`` for a smaller one), the next training batch finds parameters the hooks have not
  seen: the hooks are re-attached to the new structure (Opacus validates it again) and the DP
  optimizer is checked to hold none of the replaced parameters, so clipping and noise cover the
  pruned model.
* Under DDP, Lightning's own DDP gradient all-reduce is switched off for every training step
  (``require_backward_grad_sync = False``): the ``DistributedDPOptimizer`` clips locally, adds noise
  on rank 0 only and all-reduces the noisy sum once. Lightning's all-reduce of the raw, unclipped
  gradients would be thrown away anyway; skipping it avoids a second all-reduce per step.

==============  ================================================================================
module          concern
==============  ================================================================================
``callback``    the :class:`DifferentialPrivacy` callback: arguments, read-outs, Lightning hooks, policy
``checks``      the arguments and Trainer settings DP-SGD refuses
``plan``        N, q, δ, planned steps, noise, clipping bounds and budget of a run; its checkpoint state
``attachment``  Opacus on one fit: hooks, private loader and DP optimizer attached, kept, taken off
``outputs``     logged metrics, the report, the ε curve figure, ``privacy.json``; the key tables
``accounting``  sample rate, planned steps, noise for a target ε, ε spent, the budget (no Trainer)
``hooks``       Opacus's per-sample-gradient hooks: attach, detach, pause, re-attach, ghost clipping
``loader``      the Poisson-sampled train loader, installed through the seam
``optimizer``   the user's optimizer in Opacus's ``DPOptimizer``; per-sample gradient adjustments
``samplers``    batch samplers in front of the dataset (distributed Poisson, virtual batches)
``audit``       the :class:`PrivacyAudit` callback: one-run audit, ε lower bound beside the accountant's
``audit_*``     its canaries (``_canaries`` input, ``_gradients`` white-box), ``_bound``, ``_outputs``,
                ``_checks``
==============  ================================================================================

Example:
    >>> from lightning_trust.privacy import DifferentialPrivacy
    >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
    >>> dp.report_name
    'privacy'
"""

from lightning_trust.privacy.audit import PrivacyAudit
from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = ["DifferentialPrivacy", "PrivacyAudit"]
