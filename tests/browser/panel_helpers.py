"""Locators for the marking overlay, shared by the browser tests."""


def tile(page, i):
    return page.locator(f".hero-overlay .hero-tile[data-i='{i}']")


def tile_state(page):
    """One letter per tile: B = best, g = good, b = bad."""
    return page.eval_on_selector_all(
        ".hero-overlay .hero-tile",
        "ts => ts.map(t => (t.classList.contains('best') ? 'B' : t.classList.contains('good') ? 'g' : 'b'))")
