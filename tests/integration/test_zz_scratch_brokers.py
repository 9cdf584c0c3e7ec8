import pytest
from orchestrator import RunFailed
from tests.integration.flows import deploy

pytestmark = pytest.mark.usefixtures("worker")

def test_many_attempts(client):
    name = deploy(client, """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: f, task: tests.fail, with: {message: boom}, retry: {maxAttempts: 6, initialDelay: 10ms}}
""")
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    print(run.error)
    assert run.steps["f"].attempts == 6
