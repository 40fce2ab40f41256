"""The lab's Task model and TaskRegistry, for the Redis interop tests (tests/redis.rs).

Copied from asynchronous-orchestra-lab (part 2: "Task Registry"), unchanged except for:
  * TaskRegistry takes a key prefix (default "", which gives the lab's exact keys), so each test
    works under its own prefix on a shared server;
  * the lab's progress print()s go to stderr, so stdout carries only the answer;
  * a small command line at the bottom, used by the Rust tests.

Usage:
  python3 lab_registry.py URL PREFIX get TASK_ID
  python3 lab_registry.py URL PREFIX register PAYLOAD_JSON PRIORITY
  python3 lab_registry.py URL PREFIX update TASK_ID STATUS [RESULT]
Prints one line `RESULT:<json>` (the task as the lab's model_dump_json, or null).
Exits with status 3 and an installation hint when `redis` or `pydantic` is missing.
"""

import builtins
import sys

try:
    import redis
    from pydantic import BaseModel, Field
except ImportError as missing:  # pragma: no cover - exercised by the Rust test's message
    print(
        f"missing Python module: {missing.name}. Install the interop test requirements with: "
        "python3 -m pip install -r tests/python/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(3)

from typing import Optional, Dict, Any
from enum import Enum
import uuid
import datetime
import json


def print(*args, **kwargs):  # noqa: A001 - the lab's prints, kept off stdout
    kwargs.setdefault("file", sys.stderr)
    builtins.print(*args, **kwargs)


# 1. Task의 상태를 나타내는 Enum 정의
class TaskStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


# 2. Task 데이터 구조를 위한 Pydantic 모델 정의
class Task(BaseModel):
    task_id: str = Field(default_factory=lambda: f"task_{uuid.uuid4().hex[:8]}")
    status: TaskStatus = TaskStatus.PENDING
    payload: Dict[str, Any]
    priority: int = Field(default=5, description="작업 우선순위 (1-10, 낮을수록 높음)")
    result: Optional[str] = None
    worker_id: Optional[str] = None
    created_at: str = Field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    updated_at: str = Field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())


# 3. Task Registry 클래스 구현
class TaskRegistry:
    def __init__(self, client: redis.Redis, prefix: str = ""):
        self._client = client
        self._prefix = prefix

    def _get_task_key(self, task_id: str) -> str:
        return f"{self._prefix}task_registry:{task_id}"

    def _serialize_task_data(self, task: Task) -> Dict[str, str]:
        """Task 데이터를 Redis에 저장 가능한 형태로 직렬화"""
        data = task.model_dump()
        # payload를 JSON 문자열로 변환
        data["payload"] = json.dumps(data["payload"])
        return {k: str(v) for k, v in data.items()}

    def _deserialize_task_data(self, data: Dict[str, str]) -> Task:
        """Redis에서 가져온 데이터를 Task 객체로 역직렬화"""
        if "payload" in data:
            data["payload"] = json.loads(data["payload"])
        return Task(**data)

    def register_task(self, payload: Dict[str, Any], priority: int = 5) -> Task:
        """새로운 Task를 생성하고 Registry에 등록합니다."""
        new_task = Task(payload=payload, priority=priority)
        key = self._get_task_key(new_task.task_id)
        serialized_data = self._serialize_task_data(new_task)
        self._client.hset(key, mapping=serialized_data)
        print(f"[Registry] ✅ Task 등록됨: {new_task.task_id} (Priority: {priority}, Status: {new_task.status})")
        return new_task

    def update_task_status(
        self,
        task_id: str,
        new_status: TaskStatus,
        worker_id: Optional[str] = None,
        result: Optional[str] = None,
        priority: Optional[int] = None,
    ):
        """Task의 상태, 담당 워커, 결과 등을 업데이트합니다."""
        key = self._get_task_key(task_id)
        if not self._client.exists(key):
            print(f"[Registry] 🔴 오류: Task를 찾을 수 없음 - {task_id}")
            return

        update_data = {
            "status": new_status.value,
            "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        if worker_id:
            update_data["worker_id"] = worker_id
        if result:
            update_data["result"] = result
        if priority is not None:
            update_data["priority"] = str(priority)

        self._client.hset(key, mapping=update_data)
        print(f"[Registry] 🔄 Task 업데이트됨: {task_id} (New Status: {new_status.value})")

    def get_task(self, task_id: str) -> Optional[Task]:
        """특정 Task의 모든 정보를 가져옵니다."""
        key = self._get_task_key(task_id)
        task_data = self._client.hgetall(key)
        if not task_data:
            return None
        return self._deserialize_task_data(task_data)


def main(argv):
    if len(argv) < 4:
        print(__doc__)
        return 2
    url, prefix, command = argv[1], argv[2], argv[3]
    registry = TaskRegistry(redis.Redis.from_url(url, decode_responses=True), prefix)
    if command == "get":
        task = registry.get_task(argv[4])
    elif command == "register":
        task = registry.register_task(json.loads(argv[4]), int(argv[5]))
    elif command == "update":
        registry.update_task_status(argv[4], TaskStatus(argv[5]), result=argv[6] if len(argv) > 6 else None)
        task = registry.get_task(argv[4])
    else:
        print(f"unknown command {command!r}")
        return 2
    sys.stdout.write("RESULT:" + (task.model_dump_json() if task else "null") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
