"""The child's ClientApp (Flower Message API): the protocol's handlers, nothing about transport.

Runs unchanged on fedenc's in-process runtime, its gRPC runtime and Flower's engines. The work is
done by :mod:`fedenc.federation.child`; see there for the state a child keeps across rounds.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedenc.federation import child

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The TrainingInstruction: confirm with the number of samples, or decline with a reason."""
    return child.handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the received shared parameters; reply with the updated ones."""
    return child.handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Recall@K / MRR@K of the received parameters on local held-out data."""
    return child.handle_evaluate(msg, context)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    """The job is over: drop its state."""
    return child.handle_finish(msg, context)


@app.query("notice")
def notice(msg: Message, context: Context) -> Message:
    """The master refused this child's answer: log why."""
    return child.handle_notice(msg, context)
