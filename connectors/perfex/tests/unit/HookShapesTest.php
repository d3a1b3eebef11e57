<?php

declare(strict_types=1);

use PerfexWebhooks\Module;
use PHPUnit\Framework\TestCase;

/** Perfex's hooks, fired with the argument shapes Perfex passes, give the catalog's events. */
final class HookShapesTest extends TestCase
{
    private HarnessCI $ci;

    protected function setUp(): void
    {
        $this->ci = harness_start();
        $this->ci->model('invoices_model')->records['19'] = ['id' => 19, 'status' => '2', 'total' => '21.80', 'clientid' => '3'];
        $this->ci->model('leads_model')->records += ['7' => ['id' => '7', 'name' => 'Ada', 'status' => '2'], '8' => ['id' => '8', 'name' => 'Web']];
        $this->ci->model('clients_model')->records += ['3' => ['userid' => '3', 'company' => 'ACME'], '5' => ['id' => '5', 'userid' => '3', 'email' => 'a@b.c']];
        $this->ci->model('payments_model')->records['11'] = ['id' => '11', 'invoiceid' => '19', 'amount' => '5.00'];
        $this->ci->model('tasks_model')->records['3'] = ['id' => '3', 'status' => '5', 'name' => 'Ship'];
        $this->ci->model('estimates_model')->records['2'] = ['id' => '2', 'status' => '4'];
        $this->ci->model('staff_model')->records['9'] = ['staffid' => '9', 'active' => '0', 'firstname' => 'Bo'];
    }

    protected function tearDown(): void
    {
        Module::instance()->outbox()->take();
    }

    /** @return list<array{0: string, 1: string}> [event, resource_id] of what the hooks queued */
    private function fire(string $hook, mixed ...$args): array
    {
        hooks()->do_action($hook, ...$args);
        return array_map(fn ($e) => [$e['event'], $e['resource_id']], $this->taken = Module::instance()->outbox()->take());
    }

    private array $taken = [];

    public function testAnIdArgumentLoadsTheFullResourceThroughItsModel(): void
    {
        $this->assertSame([['invoice.created', '19']], $this->fire('after_invoice_added', 19));
        $this->assertSame(['id' => '19', 'status' => '2', 'total' => '21.80', 'clientid' => '3'], $this->taken[0]['data']);
        $this->assertContains(['get', ['19']], $this->ci->invoices_model->calls);
    }

    public function testInvoiceStatusChangedArrayGivesTheStatusEventAndItsDerivedOne(): void
    {
        $this->assertSame(
            [['invoice.status_changed', '19'], ['invoice.paid', '19']],
            $this->fire('invoice_status_changed', ['invoice_id' => 19, 'status' => 2])
        );
        $this->assertSame(
            [['invoice.status_changed', '19'], ['invoice.overdue', '19']],
            $this->fire('invoice_status_changed', ['invoice_id' => '19', 'status' => '4'])
        );
    }

    public function testLeadCreatedTakesAnIdOrTheWebToLeadArray(): void
    {
        $this->assertSame([['lead.created', '7']], $this->fire('lead_created', 7));
        $this->assertSame([['lead.created', '8']], $this->fire('lead_created', ['lead_id' => 8, 'web_to_lead_form' => true]));
        $this->assertSame('Web', $this->taken[0]['data']['name']);
    }

    public function testLeadStatusChangedCarriesTheOldStatusAsPrevious(): void
    {
        $this->fire('lead_status_changed', ['lead_id' => 7, 'old_status' => 1, 'new_status' => 2]);
        $this->assertSame('lead.status_changed', $this->taken[0]['event']);
        $this->assertSame(['status' => '1'], $this->taken[0]['previous']);
    }

    public function testAContactHookAlsoGivesItsCustomersEvent(): void
    {
        $this->assertSame([['customer.contact_added', '3'], ['contact.created', '5']], $this->fire('contact_created', 5));
        $this->assertSame('ACME', $this->taken[0]['data']['company']);
        $this->assertSame('a@b.c', $this->taken[1]['data']['email']);
    }

    public function testNoteCreatedFollowsRelTypeFromItsSecondArgument(): void
    {
        $this->ci->db->insert('tblnotes', ['id' => 4, 'rel_type' => 'lead', 'rel_id' => '7', 'description' => 'call back']);
        $this->assertSame(
            [['lead.note_added', '7'], ['note.created', '4']],
            $this->fire('note_created', 4, ['rel_type' => 'lead', 'rel_id' => 7, 'description' => 'call back'])
        );
        $this->assertSame('call back', $this->taken[1]['data']['description']);
    }

    public function testAPaymentIsAlsoItsInvoicesPaymentAdded(): void
    {
        $this->assertSame([['invoice.payment_added', '19'], ['payment.received', '11']], $this->fire('after_payment_added', 11));
    }

    public function testConversionArraysNameTheRightResource(): void
    {
        $this->assertSame([['estimate.converted', '2']], $this->fire('estimate_converted_to_invoice', ['invoice_id' => 19, 'estimate_id' => 2]));
        $this->assertSame([['task.status_changed', '3'], ['task.completed', '3']], $this->fire('task_status_changed', ['status' => 5, 'task_id' => 3]));
    }

    public function testAnObjectArgumentAndTheStaffWhoLoggedIn(): void
    {
        $this->assertSame([['contact.email_verified', '5']], $this->fire('contact_email_verified', (object) ['id' => 5, 'email' => 'a@b.c']));
        $GLOBALS['harness']['staff'] = 9;
        $this->assertSame([['staff.login', '9']], $this->fire('after_staff_login'));
        // The condition reads the loaded record when the hook does not carry the field.
        $this->assertSame([['staff.deactivated', '9']], $this->fire('after_staff_status_change', ['id' => 9]));
    }

    public function testADeleteSendsTheSnapshotTakenBeforeIt(): void
    {
        $this->fire('before_invoice_deleted', 19);
        unset($this->ci->invoices_model->records['19']);
        $this->assertSame([['invoice.deleted', '19']], $this->fire('after_invoice_deleted', 19));
        $this->assertSame('21.80', $this->taken[0]['data']['total']);
        // A hook that hands over the deleted record itself: that record is the data.
        $this->assertSame([['timesheet.deleted', '12']], $this->fire('task_timer_deleted', (object) ['id' => 12, 'task_id' => 3, 'note' => 'x']));
        $this->assertSame(['id' => '12', 'task_id' => '3', 'note' => 'x'], $this->taken[0]['data']);
        // Without a snapshot a delete still names the record.
        $this->assertSame([['item.deleted', '4']], $this->fire('item_deleted', 4));
        $this->assertSame(['id' => '4'], $this->taken[0]['data']);
    }

    public function testAnUpdateWithABeforeHookCarriesTheChangedFieldsOldValues(): void
    {
        $this->ci->db->insert('tblnotes', ['id' => 6, 'rel_type' => 'customer', 'rel_id' => '3', 'description' => 'old']);
        $this->fire('before_update_note', 6);
        $this->ci->db->where('id', 6)->update('tblnotes', ['description' => 'new']);
        $this->assertSame([['note.updated', '6']], $this->fire('note_updated', 6, ['description' => 'new']));
        $this->assertSame('new', $this->taken[0]['data']['description']);
        $this->assertSame(['description' => 'old'], $this->taken[0]['previous']);
    }

    public function testTicketSettingsUpdatedGivesPreviousAndTheFieldChangeEvents(): void
    {
        $this->ci->model('tickets_model')->records['4'] = ['ticketid' => '4', 'priority' => '3', 'assigned' => '9'];
        $args = ['ticket_id' => 4, 'original_ticket' => (object) ['ticketid' => '4', 'priority' => '1', 'assigned' => '9'], 'data' => ['priority' => 3]];
        $this->assertSame([['ticket.updated', '4'], ['ticket.priority_changed', '4']], $this->fire('ticket_settings_updated', $args));
        $this->assertSame(['priority' => '1'], $this->taken[1]['previous']);
        $args['original_ticket'] = ['ticketid' => '4', 'priority' => '3', 'assigned' => '2'];
        $this->assertSame([['ticket.updated', '4']], $this->fire('ticket_settings_updated', $args));
        $this->assertSame(['assigned' => '2'], $this->taken[0]['previous']);
    }

    public function testPerfexCoreSpellingsOfCatalogHooksAlsoSend(): void
    {
        $this->assertSame([['customer.created', '3']], $this->fire('after_client_added', 3));
        hooks()->do_action('invoice_updated', 19);
        hooks()->do_action('after_invoice_updated', 19); // the same change, reported twice in one request
        $this->assertSame(['invoice.updated'], array_column(Module::instance()->outbox()->take(), 'event'));
    }

    public function testOnlyEnabledEventsAreSent(): void
    {
        update_option('perfex_webhooks_events', json_encode(['invoice.paid']));
        Module::instance()->reset();
        $this->assertSame([['invoice.paid', '19']], $this->fire('invoice_status_changed', ['invoice_id' => 19, 'status' => 2]));
        $this->assertSame([], $this->fire('after_invoice_added', 19));
    }

    public function testAFailingModelNeverBreaksTheCrmRequest(): void
    {
        $this->ci->invoices_model = new class () {
            public function get(mixed $id): never
            {
                throw new RuntimeException('database went away');
            }
        };
        $this->assertSame([], $this->fire('after_invoice_added', 19));
        $this->assertStringContainsString('database went away', implode("\n", harness_log()));
    }

    public function testEveryResourceOfTheHookMapHasALoaderAndIdKeys(): void
    {
        $map = require HARNESS_MODULE_DIR . '/hook_map.php';
        foreach ($map['events'] as $event => $spec) {
            $this->assertArrayHasKey($spec['resource'], \PerfexWebhooks\Resources::LOADERS, $event);
            $this->assertArrayHasKey($spec['resource'], \PerfexWebhooks\Resources::ID_KEYS, $event);
            foreach ($spec['hooks'] as $hook) {
                $this->assertTrue(hooks()->has_action($hook), "no listener on $hook");
            }
        }
        $this->assertTrue(hooks()->has_action('after_cron_run'));
    }
}
