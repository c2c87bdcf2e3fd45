"""The demo page in a real headless browser: Debian's Chromium and chromedriver (``.ci/run``
installs them), driven by selenium from PyPI; nothing is downloaded at run time. The page is
served by the plain app (the same ``create_api`` routes the Serve ingress serves) on loopback."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import requests
import torch

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def page_url(syn_data, tokenizer, tmp_path_factory):
    """The plain app with a (tiny, untrained) search checkpoint and syn_data's sample users, on a free port."""
    import uvicorn

    from recsys_ray.bench.serve_plain import build_plain_app
    from recsys_ray.data.catalogue import Catalogue
    from recsys_ray.data.layout import read_manifest
    from recsys_ray.model.config import ModelConfig
    from recsys_ray.model.kinds import from_config
    from recsys_ray.runtime import free_port
    from recsys_ray.serve.api import AppArgs

    items = Catalogue.from_data_dir(syn_data)
    torch.manual_seed(0)
    model = from_config(ModelConfig(kind="retriever", history="items", tiny=TINY, search_mix=0.5), tokenizer,
                        item_tokens=items.tokens)
    ckpt = model.save(tmp_path_factory.mktemp("page") / "search", extra={"text": read_manifest(syn_data)["text"]})
    items.save(ckpt / "items.parquet")
    app, _ = build_plain_app(AppArgs(checkpoint=str(ckpt), demo_data=syn_data))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the plain app did not start"
        time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("the page test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    os.environ["SE_OFFLINE"] = "true"  # selenium manager: never download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_the_demo_page_searches_for_a_sample_user_and_recommends(page_url, browser, syn_data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    users = requests.get(f"{page_url}/demo/users", timeout=30).json()["users"]
    assert users and all(len(u["history"]) >= 5 and u["recent"] for u in users)
    browser.get(f"{page_url}/demo")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#user option")) == 1 + len(users))
    Select(browser.find_element(By.ID, "user")).select_by_value(users[0]["user_id"])
    assert users[0]["recent"][0] in browser.find_element(By.ID, "history").text  # the history, with titles
    box = browser.find_element(By.ID, "query")
    box.send_keys("a jazz gift")
    browser.find_element(By.ID, "search").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "items from the retriever"))
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results li.item span.text")]
    assert len(shown) == 10, shown
    # what the page shows is what the API answers for the same request
    body = {"user": {"history": users[0]["history"]}, "query": "a jazz gift", "k": 10}
    if users[0]["profile"]:
        body["user"]["profile"] = users[0]["profile"]
    want = requests.post(f"{page_url}/v1/search", json=body, timeout=30).json()["items"]
    assert shown == [it["text"] for it in want]
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#results li.item span.score")]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(want[0]["score"], abs=1e-3)
    browser.save_screenshot(str(tmp_path / "demo.png"))
    # recommendations for the same user; then an empty query is refused with the API's reason
    browser.find_element(By.ID, "recommend").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "items from the retriever"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li.item")) == 10
    box.clear()
    browser.find_element(By.ID, "search").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "HTTP 422"))
    assert "query is empty" in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results li.item")
