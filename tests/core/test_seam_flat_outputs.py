import torch

from lightning_trust.core.seam import flat_outputs


class _TwoOutputs(torch.nn.Module):
    def forward(self, x, *, scale):
        return {"a": x * scale, "b": (x + 1,)}


def _program():
    return torch.export.export(_TwoOutputs(), (torch.ones(2),), {"scale": torch.tensor(3.0)}).module()


def test_flat_outputs_skips_the_output_tree_and_restores_it():
    graph = _program()
    with flat_outputs(graph):
        outputs = graph.forward(torch.ones(2), torch.tensor(3.0))  # the code itself: flattened inputs, flat outputs
    assert isinstance(outputs, (tuple, list)) and len(outputs) == 2
    assert torch.equal(outputs[0], torch.full((2,), 3.0)) and torch.equal(outputs[1], torch.full((2,), 2.0))
    restored = graph(torch.ones(2), scale=torch.tensor(3.0))
    assert set(restored) == {"a", "b"} and torch.equal(restored["b"][0], torch.full((2,), 2.0))


def test_a_module_built_inside_gets_the_output_tree_back():
    graph = _program()
    with flat_outputs(graph) as restore:
        built = torch.fx.GraphModule(graph, graph.graph)  # what a pass returns: a new module, flat code
        assert isinstance(built.forward(torch.ones(2), torch.tensor(3.0)), (tuple, list))
        assert restore(built) is built
    assert set(built.forward(torch.ones(2), scale=torch.tensor(3.0))) == {"a", "b"}
