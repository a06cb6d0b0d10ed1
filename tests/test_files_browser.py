"""The files page in a real browser (Chromium): a teacher drops a file into the shared folder and sees it
listed, downloads it alone and as a zip, and closes the group's hand-in, all without a reload."""

from __future__ import annotations

import zipfile

import httpx

from browser import Browser, chromium
from conftest import StartGateway
from test_docker_desktops import docker_image, image_type, instance
from test_files_docker import files_instance

__all__ = ["chromium", "docker_image", "files_instance", "instance"]  # fixtures, imported for pytest

ROWS = "[...document.querySelectorAll('#entries tr td:first-child')].map(td => td.textContent)"
DROP = """(() => {
  const data = new DataTransfer();
  data.items.add(new File(["Aufgabe 1\\n".repeat(20000)], "Blatt 1.txt", {type: "text/plain"}));
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
})()"""


async def test_a_teacher_drops_a_file_into_the_shared_folder_and_closes_the_hand_in(
    start_gateway: StartGateway, docker_image: str, files_instance: str, chromium: Browser
) -> None:
    """Dropping a file uploads it (progress, then "stored") and lists it; its link downloads it, the
    folder's as a zip; the hand-in button closes the group's hand-in and then offers to reopen it."""
    gw = await start_gateway(image_type("standin", docker_image), instance=files_instance, dev_login="1")
    port = httpx.URL(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab()
    await tab.page.goto(gw.base_url + "/dev-login")
    await tab.page.get_by_label("Account name").fill("frau-k")
    await tab.page.get_by_label("Role").select_option("teacher")
    await tab.page.get_by_label("Groups (short names, comma-separated)").fill("5a")
    await tab.page.get_by_role("button", name="Sign in").click()
    await tab.page.get_by_role("link", name="Files").click()
    await tab.page.get_by_role("button", name="Shared: 5a").click()
    await tab.wait_for("!document.getElementById('drop').hidden", "the shared folder is not writable", 30)
    await tab.evaluate("window.notReloaded = true")

    await tab.evaluate(DROP)
    await tab.wait_for(
        "document.getElementById('message').textContent === 'Blatt 1.txt is stored.'", "no upload", 60
    )
    await tab.wait_for(f"JSON.stringify({ROWS}) === '[\"Blatt 1.txt\"]'", "the file is not listed", 30)
    link = tab.page.get_by_role("link", name="Download", exact=True)
    async with tab.page.expect_download() as download_info:
        await link.click()
    download = await download_info.value
    assert download.suggested_filename == "Blatt 1.txt"
    saved = await download.path()
    assert saved.read_bytes() == b"Aufgabe 1\n" * 20000
    async with tab.page.expect_download() as zip_info:
        await tab.page.get_by_role("link", name="Download as zip").click()
    zipped = await zip_info.value
    assert zipped.suggested_filename == "5a.zip"
    with zipfile.ZipFile(await zipped.path()) as archive:
        assert archive.read("Blatt 1.txt") == b"Aufgabe 1\n" * 20000

    await tab.page.get_by_role("button", name="Close hand-in").click()
    await tab.page.get_by_role("button", name="Reopen").wait_for()
    assert "5a: closed, nothing can be handed in." in await tab.page.locator("#handin-list").inner_text()
    assert await tab.evaluate("window.notReloaded === true")
    assert [line for line in tab.console if "exception" in line] == []
