"""Two users chat through a Pigeon server with the Python SDK: a text and a file, received and
checked. Run it against a running server (`make run` serves http://127.0.0.1:8080):

    .venv/bin/python examples/chat.py [SERVER_URL]      # or set PIGEON_SERVER
"""

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

from pigeon.client import Message, PigeonClient, find_user, login, register

PASSWORD = "correct horse battery"


async def main(server: str, folder: Path) -> None:
    alice_name, bob_name = f"alice_{uuid.uuid4().hex[:6]}", f"bob_{uuid.uuid4().hex[:6]}"
    await register(server, alice_name, PASSWORD)
    await register(server, bob_name, PASSWORD)
    # Both log a device in first: a device receives what is sent after it exists.
    alice = await login(server, alice_name, PASSWORD, "example")
    bob = await login(server, bob_name, PASSWORD, "example")

    async with PigeonClient(server, alice.token) as client:
        bob_id = await find_user(server, alice.token, bob_name)
        chat = await client.create_chat([bob_id])  # their direct chat
        await client.send(chat["id"], "hello bob")  # returns once durably committed
        await client.send_file(chat["id"], folder / "note.txt", "the plan")  # upload, send
    print(f"{alice_name} sent a text and a file to {bob_name}")

    async with PigeonClient(server, bob.token) as client:
        async for event in client.events():  # messages, receipts, chat updates, in order
            if not isinstance(event, Message):
                continue  # here: the chat_update saying the chat was created
            if event.attachment is None:
                print(f"{bob_name} got: {event.body}")
                continue
            attachment = event.attachment  # streamed to disk, its SHA-256 checked
            await client.download(attachment.id, folder / "copy.txt", sha256=attachment.sha256)
            print(f"{bob_name} got {attachment.filename} ({event.body!r}), sha256 checked")
            break  # events taken from events() are acked when the client closes


if __name__ == "__main__":
    server = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PIGEON_SERVER", "")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "note.txt").write_text("meet at 8\n")
        asyncio.run(main(server or "http://127.0.0.1:8080", Path(tmp)))
