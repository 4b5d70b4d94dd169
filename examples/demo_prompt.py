import os
import sys
from collections import defaultdict


class Inventory:
    """A small store of items with quantities and prices."""

    def __init__(self, name):
        self.name = name
        self.items = {}
        self.prices = {}
        self.history = defaultdict(list)

    def add(self, item, quantity, price=None):
        if quantity < 0:
            raise ValueError("quantity must not be negative")
        self.items[item] = self.items.get(item, 0) + quantity
        if price is not None:
            self.prices[item] = price
        self.history[item].append(("add", quantity))
        return self.items[item]

    def remove(self, item, quantity):
        if item not in self.items:
            raise KeyError(item)
        if quantity > self.items[item]:
            raise ValueError("not enough %s in stock" % item)
        self.items[item] -= quantity
        self.history[item].append(("remove", quantity))
        if self.items[item] == 0:
            del self.items[item]
        return self.items.get(item, 0)

    def value(self):
        total = 0
        for item, quantity in self.items.items():
            total += quantity * self.prices.get(item, 0)
        return total

    def report(self, stream=None):
        if stream is None:
            stream = sys.stdout
        for item in sorted(self.items):
            stream.write("%s: %d\n" % (item, self.items[item]))


def load_inventory(path):
    inventory = Inventory(os.path.basename(path))
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            item, quantity, price = line.split(",")
            inventory.add(item, int(quantity), float(price))
    return inventory


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    for path in argv:
        inventory = load_inventory(path)
        inventory.report()
        print("total value:", inventory.value())


if __name__ == "__main__":
    main()


class Ledger:
    """Records every change made to an inventory."""

    def __init__(self, inventory):
        self.inventory = inventory
        self.entries = []

    def record(self, item, quantity):
